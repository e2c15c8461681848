use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::*;
use crate::state::policy::ConnectionInfo;
use crate::state::workload::GatewayDestination;
use crate::state::{Decision, Destination, authorize};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn err(yaml: &str) -> String {
    match parse("config.yaml", yaml) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

fn example_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/local-mesh.yaml")
}

#[test]
fn example_mesh_loads() {
    let s = load(&example_path()).unwrap();
    assert_eq!(s.workloads().count(), 3);
    assert_eq!(s.services().count(), 1);
    assert_eq!(s.policies().count(), 2);

    let sleep = s.workload_by_ip(ip("10.10.1.10")).unwrap();
    assert_eq!(sleep.uid, "Kubernetes//v1/Pod/default/sleep-7d9c");
    assert_eq!(
        sleep.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/sleep"
    );
    assert_eq!(sleep.protocol, Protocol::Hbone);
    assert_eq!(sleep.labels.get("app").map(String::as_str), Some("sleep"));
    assert_eq!(sleep.labels.get("version").map(String::as_str), Some("v1"));
    assert_eq!(
        sleep.netns.as_deref(),
        Some(Path::new("/var/run/netns/sleep"))
    );
    assert!(s.is_captured(&sleep));
    assert_eq!(s.local_workloads("node-a").len(), 2);
    assert_eq!(s.local_workloads("node-b").len(), 1);

    let Destination::Service { service, endpoints } = s.resolve("10.96.0.20:80".parse().unwrap())
    else {
        panic!("VIP not resolved to the service");
    };
    assert_eq!(service.hostname, "echo.default.svc.cluster.local");
    let addrs: Vec<SocketAddr> = endpoints.iter().map(|(_, a)| *a).collect();
    assert_eq!(
        addrs,
        [
            "10.10.1.20:8080".parse().unwrap(),
            "10.10.2.20:8080".parse().unwrap()
        ]
    );

    let echo = s
        .workload_by_uid("Kubernetes//v1/Pod/default/echo-2")
        .unwrap();
    let conn = |sa: Option<&str>, port: u16| ConnectionInfo {
        src_identity: sa.map(|sa| Identity::new("cluster.local", "default", sa).unwrap()),
        src_ip: ip("10.10.1.10"),
        dst_ip: ip("10.10.2.20"),
        dst_port: port,
    };
    assert_eq!(
        authorize(&conn(Some("sleep"), 8080), &echo, &s),
        Decision::Allow
    );
    assert!(!authorize(&conn(Some("other"), 8080), &echo, &s).is_allow());
    assert!(!authorize(&conn(None, 8080), &echo, &s).is_allow());
    assert!(!authorize(&conn(Some("sleep"), 8081), &echo, &s).is_allow());
    match authorize(&conn(Some("sleep"), 9999), &echo, &s) {
        Decision::Deny { policy, .. } => {
            assert_eq!(policy.as_deref(), Some("default/deny-debug-port"));
        }
        other => panic!("{other:?}"),
    }
    // sleep is not selected by the ALLOW policy: only the DENY applies to it.
    assert!(authorize(&conn(Some("x"), 8080), &sleep, &s).is_allow());
    assert!(!authorize(&conn(Some("x"), 9999), &sleep, &s).is_allow());
}

/// The shape Istio's own local config uses (istio/ztunnel examples/localhost.yaml and its test
/// helpers): every field below must be accepted as Istio writes it.
#[test]
fn istio_shaped_file_loads() {
    let yaml = r#"
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  status: Healthy
  clusterId: cluster1
  workloadName: local
  workloadType: pod
  locality: {region: r, zone: z, subzone: ""}
  capacity: 1
  waypoint:
    destination: /127.0.0.10
    hboneMtlsPort: 15008
  services:
    "default/example.com":
      80: 8080
    "default/example2.com":
      80: 8080
- name: local-tcp
  namespace: default
  workloadIps: ["127.0.0.2", "::2"]
  protocol: TCP
  node: local
  services:
    "default/example.com":
      80: 8080
policies:
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
        - namespaces:
          - Presence: []
          principals:
          - Prefix: cluster.local/
          sourceIps: ["10.0.0.0/8", "127.0.0.1"]
          serviceAccounts:
          - namespace: default
            serviceAccount: sleep
    name: deny-9999
    namespace: default
    scope: Namespace
    dryRun: false
services:
- name: local
  namespace: default
  hostname: example.com
  vips:
    - /127.10.0.1
  ports:
    80: 8080
  subjectAltNames:
   - spiffe://cluster.local/ns/default/sa/local
  canonical: true
- name: remote
  namespace: default
  hostname: example2.com
  vips:
    - remote/127.10.0.2
    - 127.10.0.3
  ports:
    80: 8080
  waypoint:
    destination: default/waypoint.default.svc.cluster.local
    hboneMtlsPort: 15008
  canonical: true
"#;
    let s = parse("localhost.yaml", yaml).unwrap();
    let local = s.workload_by_ip(ip("127.0.0.1")).unwrap();
    assert_eq!(local.cluster_id, "cluster1");
    assert_eq!(local.trust_domain(), "cluster.local");
    assert_eq!(
        local.waypoint.as_ref().unwrap().destination,
        GatewayDestination::Address(ip("127.0.0.10"))
    );
    // No uid: derived from cluster, namespace and name; defaults for the identity.
    let tcp = s.workload_by_ip(ip("::2")).unwrap();
    assert_eq!(tcp.uid, "Kubernetes//v1/Pod/default/local-tcp");
    assert_eq!(tcp.service_account(), "default");
    assert_eq!(tcp.protocol, Protocol::Tcp);
    let remote = s.service_by_vip(ip("127.10.0.3")).unwrap();
    assert_eq!(remote.name, "remote");
    assert_eq!(s.service_by_vip(ip("127.10.0.2")).unwrap().name, "remote");
    assert!(matches!(
        remote.waypoint.as_ref().unwrap().destination,
        GatewayDestination::Hostname(_)
    ));
    let p = s.policies().next().unwrap();
    assert_eq!(p.rules[0][0].len(), 2);
    assert_eq!(p.rules[0][0][1].namespaces, [StringMatch::Presence]);
    assert!(!s.is_captured(&local), "no namespace labelled ambient");
}

#[test]
fn empty_file_is_an_empty_mesh() {
    for yaml in ["", "\n# nothing\n", "{}", "workloads: []"] {
        let s = parse("c.yaml", yaml).unwrap();
        assert_eq!(s.workloads().count(), 0, "{yaml:?}");
        // A file read is the whole mesh: its emptiness means no pods, nothing pending.
        assert_eq!(s.incomplete(), None, "{yaml:?}");
    }
}

const W: &str = "workloads:\n- name: echo\n  namespace: default\n";

#[test]
fn invalid_values_name_file_item_and_field() {
    let cases: Vec<(String, &str)> = vec![
        (
            format!("{W}  workloadIps: [\"10.0.0.x\"]\n"),
            r#"config.yaml: workloads[0] (name "echo"): workloadIps[0] "10.0.0.x" is not an IP address"#,
        ),
        (
            format!("{W}  protocol: QUIC\n"),
            r#"config.yaml: workloads[0] (name "echo"): protocol "QUIC" is not one of HBONE, TCP"#,
        ),
        (
            format!("{W}  status: Sick\n"),
            r#"workloads[0] (name "echo"): status "Sick" is not one of Healthy, Unhealthy"#,
        ),
        (
            "workloads:\n- name: echo\n  namespace: a/b\n".to_owned(),
            r#"workloads[0] (name "echo"): namespace "a/b" must be non-empty"#,
        ),
        (
            "workloads:\n- name: echo\n".to_owned(),
            r#"workloads[0] (name "echo"): namespace "" must be non-empty"#,
        ),
        (
            format!("{W}  serviceAccount: \"my sa\"\n"),
            r#"serviceAccount "my sa" must be non-empty"#,
        ),
        (
            format!("{W}  trustDomain: td/x\n"),
            r#"trustDomain "td/x" must be non-empty"#,
        ),
        (
            "workloads:\n- namespace: default\n".to_owned(),
            "config.yaml: workloads[0]: name is required",
        ),
        (
            format!("{W}  netns: relative/path\n"),
            r#"netns "relative/path" is not an absolute path"#,
        ),
        (
            format!("{W}  services:\n    echo:\n      80: 8080\n"),
            r#"services key "echo" is not <namespace>/<hostname>"#,
        ),
        (
            format!("{W}  services:\n    default/missing:\n      80: 8080\n"),
            r#"services key "default/missing" names no service in this file"#,
        ),
        (
            format!("{W}  authorizationPolicies: [default/nope]\n"),
            r#"authorizationPolicies[0] "default/nope" names no policy"#,
        ),
        (
            format!("{W}  waypoint: {{destination: nothing, hboneMtlsPort: 15008}}\n"),
            r#"waypoint.destination "nothing" is neither"#,
        ),
        (
            format!("{W}  labels: {{istio.io/use-waypoint: My_Waypoint}}\n"),
            r#"label istio.io/use-waypoint "My_Waypoint" is not a name"#,
        ),
        (
            "services:\n- {name: echo, namespace: default, hostname: echo, labels: {istio.io/use-waypoint: wp},\n   waypoint: {destination: default/wp.default.svc.cluster.local, hboneMtlsPort: 15008}}\n".to_owned(),
            r#"services[0] (name "echo"): waypoint and the label istio.io/use-waypoint are both set: keep one"#,
        ),
        (
            "namespaces:\n- {name: default, labels: {istio.io/use-waypoint: \"wp.x\"}}\nservices:\n- {name: echo, namespace: default, hostname: echo}\n".to_owned(),
            r#"services[0] (name "echo"): namespace label istio.io/use-waypoint "wp.x" is not a name"#,
        ),
        (
            "services:\n- name: echo\n  namespace: default\n  hostname: echo\n  ports:\n    http: 8080\n".to_owned(),
            r#"config.yaml: services[0] (name "echo"): ports: service port "http" is not a number from 1 to 65535"#,
        ),
        (
            "services:\n- name: echo\n  namespace: default\n  hostname: echo\n  ports:\n    80: 70000\n".to_owned(),
            r#"services[0] (name "echo"): ports[80]: target port "70000" is not a number from 0 to 65535"#,
        ),
        (
            "services:\n- name: echo\n  namespace: default\n  hostname: echo\n  ports:\n    0: 80\n".to_owned(),
            r#"service port "0" is not a number from 1 to 65535"#,
        ),
        (
            "services:\n- name: echo\n  namespace: default\n  hostname: echo\n  vips: [nope/10.0.0]\n".to_owned(),
            r#"services[0] (name "echo"): vips[0] "nope/10.0.0" is not an IP address or <network>/<ip>"#,
        ),
        (
            "services:\n- name: echo\n  namespace: default\n".to_owned(),
            r#"services[0] (name "echo"): hostname is required"#,
        ),
        (
            "services:\n- name: e\n  namespace: d\n  hostname: h\n  subjectAltNames: [echo]\n".to_owned(),
            r#"subjectAltNames[0] "echo" is not spiffe://"#,
        ),
        (
            "policies:\n- name: p\n  namespace: default\n  scope: Cluster\n  action: Allow\n".to_owned(),
            r#"config.yaml: policies[0] (name "p"): scope "Cluster" is not one of Global, Namespace, WorkloadSelector"#,
        ),
        (
            "policies:\n- name: p\n  namespace: default\n  scope: Global\n  action: Audit\n".to_owned(),
            r#"policies[0] (name "p"): action "Audit" is not one of Allow, Deny"#,
        ),
        (
            "policies:\n- name: p\n  namespace: default\n  scope: Global\n  action: Deny\n  rules: [[[{sourceIps: [10.0.0.0/33]}]]]\n".to_owned(),
            r#"policies[0] (name "p"): rules[0][0][0].sourceIps[0] "10.0.0.0/33" is not an IP address or CIDR"#,
        ),
        (
            "namespaces:\n- name: a\n- name: a\n".to_owned(),
            r#"namespaces[1] (name "a"): namespace "a" is defined twice"#,
        ),
    ];
    for (yaml, want) in cases {
        let got = err(&yaml);
        assert!(
            got.contains(want),
            "for\n{yaml}\nwant {want:?}\ngot  {got:?}"
        );
    }
}

#[test]
fn duplicates_are_rejected() {
    let two = |a: &str, b: &str| {
        format!(
            "workloads:\n- {{uid: u1, name: a, namespace: d, workloadIps: [\"{a}\"]}}\n- {{uid: {b}, name: b, namespace: d, workloadIps: [\"10.0.0.2\"]}}\n"
        )
    };
    assert!(
        err(&two("10.0.0.1", "u1"))
            .contains(r#"workloads[1] (name "b"): uid "u1" is already used"#)
    );
    assert!(
        err(&two("10.0.0.2", "u2")).contains(
            r#"workloads[1] (name "b"): address 10.0.0.2 is already used by workload u1"#
        )
    );
    let svc = "services:\n- {name: a, namespace: d, hostname: h, vips: [10.0.0.1]}\n";
    assert!(
        err(&format!("{svc}{}", two("10.0.0.1", "u2")))
            .contains("address 10.0.0.1 is already used by service d/h")
    );
    let pol = "- {name: p, namespace: d, scope: Global, action: Deny}\n";
    assert!(
        err(&format!("policies:\n{pol}{pol}"))
            .contains(r#"policies[1] (name "p"): policy d/p is defined twice"#)
    );
}

#[test]
fn every_problem_is_reported() {
    let yaml = "workloads:\n- name: a\n  namespace: d\n  workloadIps: [x, y]\n  protocol: FOO\n";
    let e = parse("c.yaml", yaml).unwrap_err();
    let LocalConfigError::Invalid { problems, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert_eq!(e.to_string().lines().count(), 3);
    assert!(
        e.to_string()
            .lines()
            .all(|l| l.starts_with("c.yaml: workloads[0]"))
    );
}

#[test]
fn shape_errors_carry_line_and_column() {
    let cases = [
        // A typo in a field name is not silently dropped.
        (format!("{W}  workloadIP: 10.0.0.1\n"), "config.yaml:4:", "workloadIP"),
        ("workload: []\n".to_owned(), "config.yaml:1:", "workload"),
        ("policies:\n- name: p\n  namespace: d\n  scope: Global\n  action: Deny\n  rules: [[[{sourceIP: [1.2.3.4]}]]]\n".to_owned(), "config.yaml:6:", "sourceIP"),
        ("policies:\n- name: p\n  namespace: d\n  scope: Global\n  action: Deny\n  rules: [[[{namespaces: [{Regex: x}]}]]]\n".to_owned(), "config.yaml:6:", "Regex"),
        (format!("{W}  services:\n    d/h:\n      80: [1]\n"), "config.yaml:6:", ""),
        ("workloads: [\n".to_owned(), "config.yaml:", ""),
        ("workloads:\n  - name: a\n   namespace: b\n".to_owned(), "config.yaml:", ""),
    ];
    for (yaml, prefix, mentions) in cases {
        let e = parse("config.yaml", &yaml).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, LocalConfigError::Syntax { .. }), "{text}");
        assert!(
            text.starts_with(prefix),
            "for\n{yaml}\nwant prefix {prefix:?}, got {text:?}"
        );
        assert!(
            text.contains(mentions),
            "for\n{yaml}\nwant {mentions:?} in {text:?}"
        );
    }
}

#[test]
fn hostile_input_is_bounded() {
    // A billion-laughs style alias expansion must fail on the budget, not eat memory.
    // Anchors hidden in an ignored field (locality), each alias list ten times the last.
    let mut yaml = String::from(
        "workloads:\n- {name: w0, namespace: d, locality: &a0 [x, x, x, x, x, x, x, x, x, x]}\n",
    );
    for i in 1..12 {
        let prev = format!("*a{}", i - 1);
        let list = [prev.as_str(); 10].join(", ");
        yaml.push_str(&format!(
            "- {{name: w{i}, namespace: d, locality: &a{i} [{list}]}}\n"
        ));
    }
    assert!(matches!(
        parse("c.yaml", &yaml),
        Err(LocalConfigError::Syntax { .. })
    ));
    let deep = format!("workloads: {}{}", "[".repeat(500), "]".repeat(500));
    assert!(matches!(
        parse("c.yaml", &deep),
        Err(LocalConfigError::Syntax { .. })
    ));
    let multi = "workloads: []\n---\nworkloads: []\n";
    assert!(parse("c.yaml", multi).is_err());
}

#[test]
fn unreadable_file_names_the_path() {
    let e = load(Path::new("/nonexistent/mesh.yaml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/mesh.yaml: cannot read:"),
        "{e}"
    );
}

#[test]
fn service_app_protocols_are_read_and_checked() {
    let svc = |protocols: &str| {
        format!(
            "services:\n  - name: s\n    namespace: default\n    hostname: s.default.svc.cluster.local\n    vips: [\"10.0.0.1\"]\n    ports: {{\"80\": \"8080\", \"81\": \"8081\"}}\n    appProtocols: {protocols}\n"
        )
    };
    let state = parse("config.yaml", &svc("{\"80\": tcp, \"81\": grpc}")).unwrap();
    let s = state.services().next().unwrap();
    use crate::state::service::AppProtocol;
    assert_eq!(s.app_protocols.get(&80), Some(&AppProtocol::Tcp));
    assert_eq!(s.app_protocols.get(&81), Some(&AppProtocol::Grpc));
    let e = err(&svc("{\"90\": tcp}"));
    assert!(
        e.contains("appProtocols: \"90\" is not one of the service's ports"),
        "{e}"
    );
    let e = err(&svc("{\"80\": carrier-pigeon}"));
    assert!(
        e.contains("appProtocols[80]: \"carrier-pigeon\" is not a protocol"),
        "{e}"
    );
}
