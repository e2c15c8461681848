{{/*
Shared pieces of the chart's templates: names, labels, image references, istiod's URL.
*/}}

{{- define "dataplane.labels" -}}
app.kubernetes.io/part-of: ambient-dataplane
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* An image reference: (dict "root" $ "name" <image name>). */}}
{{- define "dataplane.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .root.Values.image.hub -}}
{{ printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.hub) .name $tag }}
{{- else -}}
{{ printf "%s:%s" .name $tag }}
{{- end -}}
{{- end -}}

{{- define "dataplane.pullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* istiod's xDS and CA URL. */}}
{{- define "dataplane.istiodUrl" -}}
https://{{ .Values.istiod.address }}
{{- end -}}

{{- define "dataplane.prometheusAnnotations" -}}
{{- if .Values.mesh.prometheusScrape }}
prometheus.io/scrape: "true"
prometheus.io/port: "15020"
prometheus.io/path: /stats/prometheus
{{- end }}
{{- end -}}

{{/* Names of the waypoint objects that several templates share. */}}
{{- define "dataplane.waypointClusterRole" -}}
{{ .Release.Name }}-waypoint
{{- end -}}
{{- define "dataplane.controllerName" -}}
{{ .Release.Name }}-waypoint-controller
{{- end -}}
