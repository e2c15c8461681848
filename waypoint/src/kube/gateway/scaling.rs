//! A waypoint's availability objects (pure), when the settings ask for them: a
//! PodDisruptionBudget (`policy/v1`) that keeps `minAvailable` pods through voluntary
//! evictions such as node drains, and a HorizontalPodAutoscaler (`autoscaling/v2`) that
//! scales the Deployment on CPU. Both are named after the Gateway and owned by it.

use serde_json::{Value as Json, json};

use super::config::{Autoscaling, PodDisruptionBudget};
use super::render::{GATEWAY_NAME_LABEL, labels, meta, str_at};

/// The PodDisruptionBudget of the waypoint of `gateway`.
pub fn pod_disruption_budget(gateway: &Json, settings: &PodDisruptionBudget) -> Json {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(gateway, labels(gateway)),
        "spec": {
            "minAvailable": settings.min_available,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: str_at(gateway, "/metadata/name")}},
        },
    })
}

/// The HorizontalPodAutoscaler of the waypoint of `gateway` (its Deployment then carries no
/// `replicas`, which the autoscaler owns).
pub fn horizontal_pod_autoscaler(gateway: &Json, settings: &Autoscaling) -> Json {
    json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta(gateway, labels(gateway)),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": str_at(gateway, "/metadata/name"),
            },
            "minReplicas": settings.min_replicas,
            "maxReplicas": settings.max_replicas,
            "metrics": [{
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {
                        "type": "Utilization",
                        "averageUtilization": settings.target_cpu_utilization_percentage,
                    },
                },
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> Json {
        json!({"metadata": {"name": "waypoint", "namespace": "bookinfo", "uid": "u-1"},
               "spec": {"gatewayClassName": "ambient-waypoint"}})
    }

    #[test]
    fn the_budget_and_the_autoscaler_select_the_waypoint_and_are_owned_by_its_gateway() {
        let pdb = pod_disruption_budget(
            &gateway(),
            &PodDisruptionBudget {
                enabled: true,
                min_available: 2,
            },
        );
        assert_eq!(pdb["spec"]["minAvailable"], 2);
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"][GATEWAY_NAME_LABEL],
            "waypoint"
        );
        let hpa = horizontal_pod_autoscaler(
            &gateway(),
            &Autoscaling {
                enabled: true,
                min_replicas: 2,
                max_replicas: 7,
                target_cpu_utilization_percentage: 60,
            },
        );
        assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "waypoint");
        assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
        assert_eq!(
            (
                hpa["spec"]["minReplicas"].as_u64(),
                hpa["spec"]["maxReplicas"].as_u64()
            ),
            (Some(2), Some(7))
        );
        assert_eq!(
            hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
            60
        );
        for o in [pdb, hpa] {
            assert_eq!(o["metadata"]["namespace"], "bookinfo");
            assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], "u-1");
        }
    }
}
