use std::net::IpAddr;

use super::*;
use crate::identity::Identity;
use crate::state::policy::{Cidr, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch};
use crate::state::{Namespace, State};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.to_owned())
}

/// sleep in `default` (10.0.0.1) -> 10.0.1.1:8080, over mTLS.
fn conn() -> ConnectionInfo {
    ConnectionInfo {
        src_identity: Some(Identity::new("cluster.local", "default", "sleep").unwrap()),
        src_ip: ip("10.0.0.1"),
        dst_ip: ip("10.0.1.1"),
        dst_port: 8080,
    }
}

fn plaintext() -> ConnectionInfo {
    ConnectionInfo {
        src_identity: None,
        ..conn()
    }
}

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> Authorization {
    Authorization {
        name: name.to_owned(),
        namespace: "default".to_owned(),
        scope: Scope::Namespace,
        action,
        rules,
        dry_run: false,
    }
}

/// A policy with one rule of one clause of one match.
fn one(name: &str, action: Action, m: Match) -> Authorization {
    policy(name, action, vec![vec![vec![m]]])
}

#[test]
fn match_fields() {
    let m = Match::default;
    let cases: Vec<(&str, Match, ConnectionInfo, bool)> = vec![
        ("empty match matches nothing", m(), conn(), false),
        (
            "namespace exact",
            Match {
                namespaces: vec![exact("default")],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "namespace other",
            Match {
                namespaces: vec![exact("prod")],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "namespace any of",
            Match {
                namespaces: vec![exact("prod"), exact("default")],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "namespace prefix",
            Match {
                namespaces: vec![StringMatch::Prefix("def".into())],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "namespace suffix",
            Match {
                namespaces: vec![StringMatch::Suffix("ult".into())],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "namespace presence",
            Match {
                namespaces: vec![StringMatch::Presence],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "namespace presence without identity",
            Match {
                namespaces: vec![StringMatch::Presence],
                ..m()
            },
            plaintext(),
            false,
        ),
        (
            "namespace without identity",
            Match {
                namespaces: vec![exact("default")],
                ..m()
            },
            plaintext(),
            false,
        ),
        (
            "not namespace hit",
            Match {
                not_namespaces: vec![exact("default")],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "not namespace miss",
            Match {
                not_namespaces: vec![exact("prod")],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "not namespace without identity",
            Match {
                not_namespaces: vec![exact("default")],
                ..m()
            },
            plaintext(),
            true,
        ),
        (
            "namespace and not namespace",
            Match {
                namespaces: vec![StringMatch::Prefix("d".into())],
                not_namespaces: vec![exact("default")],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "principal exact",
            Match {
                principals: vec![exact("cluster.local/ns/default/sa/sleep")],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "principal with scheme never matches",
            Match {
                principals: vec![exact("spiffe://cluster.local/ns/default/sa/sleep")],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "principal suffix",
            Match {
                principals: vec![StringMatch::Suffix("/sa/sleep".into())],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "principal prefix other td",
            Match {
                principals: vec![StringMatch::Prefix("other.td/".into())],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "principal presence",
            Match {
                principals: vec![StringMatch::Presence],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "principal presence without identity",
            Match {
                principals: vec![StringMatch::Presence],
                ..m()
            },
            plaintext(),
            false,
        ),
        (
            "principal exact empty without identity",
            Match {
                principals: vec![exact("")],
                ..m()
            },
            plaintext(),
            false,
        ),
        (
            "not principal hit",
            Match {
                not_principals: vec![StringMatch::Suffix("/sa/sleep".into())],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "not principal without identity",
            Match {
                not_principals: vec![StringMatch::Presence],
                ..m()
            },
            plaintext(),
            true,
        ),
        (
            "service account",
            Match {
                service_accounts: vec![ServiceAccountMatch {
                    namespace: "default".into(),
                    service_account: "sleep".into(),
                }],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "service account other ns",
            Match {
                service_accounts: vec![ServiceAccountMatch {
                    namespace: "prod".into(),
                    service_account: "sleep".into(),
                }],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "service account without identity",
            Match {
                service_accounts: vec![ServiceAccountMatch {
                    namespace: "default".into(),
                    service_account: "sleep".into(),
                }],
                ..m()
            },
            plaintext(),
            false,
        ),
        (
            "not service account hit",
            Match {
                not_service_accounts: vec![ServiceAccountMatch {
                    namespace: "default".into(),
                    service_account: "sleep".into(),
                }],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "source ip in cidr",
            Match {
                source_ips: vec![cidr("10.0.0.0/24")],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "source ip exact",
            Match {
                source_ips: vec![cidr("10.0.0.1")],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "source ip outside",
            Match {
                source_ips: vec![cidr("10.0.9.0/24")],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "source ip any of",
            Match {
                source_ips: vec![cidr("10.0.9.0/24"), cidr("10.0.0.0/16")],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "not source ip hit",
            Match {
                not_source_ips: vec![cidr("10.0.0.0/8")],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "not source ip miss",
            Match {
                not_source_ips: vec![cidr("192.168.0.0/16")],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "source ip v6 cidr vs v4 conn",
            Match {
                source_ips: vec![cidr("::/0")],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "destination ip",
            Match {
                destination_ips: vec![cidr("10.0.1.0/24")],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "destination ip outside",
            Match {
                destination_ips: vec![cidr("10.0.2.0/24")],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "not destination ip hit",
            Match {
                not_destination_ips: vec![cidr("10.0.1.1")],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "destination port",
            Match {
                destination_ports: vec![8080],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "destination port any of",
            Match {
                destination_ports: vec![80, 8080],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "destination port other",
            Match {
                destination_ports: vec![80],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "not destination port hit",
            Match {
                not_destination_ports: vec![8080],
                ..m()
            },
            conn(),
            false,
        ),
        (
            "not destination port miss",
            Match {
                not_destination_ports: vec![9999],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "all fields hold",
            Match {
                namespaces: vec![exact("default")],
                principals: vec![StringMatch::Suffix("sleep".into())],
                source_ips: vec![cidr("10.0.0.0/8")],
                destination_ips: vec![cidr("10.0.1.1")],
                destination_ports: vec![8080],
                ..m()
            },
            conn(),
            true,
        ),
        (
            "one field fails",
            Match {
                namespaces: vec![exact("default")],
                destination_ports: vec![80],
                ..m()
            },
            conn(),
            false,
        ),
    ];
    for (desc, m, c, want) in cases {
        assert_eq!(m.matches(&c), want, "{desc}");
    }
}

#[test]
fn rule_structure() {
    let hit = || Match {
        destination_ports: vec![8080],
        ..Match::default()
    };
    let miss = || Match {
        destination_ports: vec![80],
        ..Match::default()
    };
    let cases: Vec<(&str, Vec<Rule>, bool)> = vec![
        ("no rules matches nothing", vec![], false),
        (
            "a rule with no clauses matches everything",
            vec![vec![]],
            true,
        ),
        ("an empty clause matches", vec![vec![Clause::new()]], true),
        (
            "a clause of one empty match does not match",
            vec![vec![vec![Match::default()]]],
            false,
        ),
        (
            "clause: any match (hit, miss)",
            vec![vec![vec![miss(), hit()]]],
            true,
        ),
        (
            "clause: any match (miss, miss)",
            vec![vec![vec![miss(), miss()]]],
            false,
        ),
        (
            "rule: all clauses (hit, hit)",
            vec![vec![vec![hit()], vec![hit()]]],
            true,
        ),
        (
            "rule: all clauses (hit, miss)",
            vec![vec![vec![hit()], vec![miss()]]],
            false,
        ),
        (
            "policy: any rule (miss rule, hit rule)",
            vec![vec![vec![miss()]], vec![vec![hit()]]],
            true,
        ),
        (
            "policy: any rule (miss, miss)",
            vec![vec![vec![miss()]], vec![vec![miss()]]],
            false,
        ),
        (
            "policy: empty rule beside a missing one",
            vec![vec![vec![miss()]], vec![]],
            true,
        ),
    ];
    for (desc, rules, want) in cases {
        assert_eq!(
            policy("p", Action::Allow, rules).matches(&conn()),
            want,
            "{desc}"
        );
    }
}

#[test]
fn verdicts() {
    let port = |p: u16| Match {
        destination_ports: vec![p],
        ..Match::default()
    };
    let deny_default = Decision::Deny {
        policy: None,
        reason: DenyReason::NoAllowPolicyMatched,
    };
    let denied_by = |k: &str| Decision::Deny {
        policy: Some(k.to_owned()),
        reason: DenyReason::DenyPolicyMatched,
    };
    let dry = |mut p: Authorization| {
        p.dry_run = true;
        p
    };
    let cases: Vec<(&str, Vec<Authorization>, Decision)> = vec![
        ("no policy allows", vec![], Decision::Allow),
        (
            "matching allow",
            vec![one("a", Action::Allow, port(8080))],
            Decision::Allow,
        ),
        (
            "non-matching allow denies",
            vec![one("a", Action::Allow, port(80))],
            deny_default.clone(),
        ),
        (
            "one of two allows matches",
            vec![
                one("a", Action::Allow, port(80)),
                one("b", Action::Allow, port(8080)),
            ],
            Decision::Allow,
        ),
        (
            "allow with no rules denies (allow-nothing)",
            vec![policy("a", Action::Allow, vec![])],
            deny_default.clone(),
        ),
        (
            "allow with an empty rule allows all",
            vec![policy("a", Action::Allow, vec![vec![]])],
            Decision::Allow,
        ),
        (
            "matching deny",
            vec![one("d", Action::Deny, port(8080))],
            denied_by("default/d"),
        ),
        (
            "non-matching deny allows",
            vec![one("d", Action::Deny, port(80))],
            Decision::Allow,
        ),
        (
            "deny with no rules denies nothing",
            vec![policy("d", Action::Deny, vec![])],
            Decision::Allow,
        ),
        (
            "deny wins over matching allow",
            vec![
                one("a", Action::Allow, port(8080)),
                one("d", Action::Deny, port(8080)),
            ],
            denied_by("default/d"),
        ),
        (
            "non-matching deny then matching allow",
            vec![
                one("d", Action::Deny, port(80)),
                one("a", Action::Allow, port(8080)),
            ],
            Decision::Allow,
        ),
        (
            "non-matching deny and non-matching allow",
            vec![
                one("d", Action::Deny, port(80)),
                one("a", Action::Allow, port(80)),
            ],
            deny_default.clone(),
        ),
        (
            "dry-run deny is not enforced",
            vec![dry(one("d", Action::Deny, port(8080)))],
            Decision::Allow,
        ),
        (
            "dry-run allow does not close the door",
            vec![dry(one("a", Action::Allow, port(80)))],
            Decision::Allow,
        ),
    ];
    for (desc, policies, want) in cases {
        assert_eq!(decide(&conn(), policies.iter()), want, "{desc}");
    }
}

#[test]
fn policies_apply_by_scope() {
    let deny_all = |name: &str, ns: &str, scope: Scope| Authorization {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        scope,
        action: Action::Deny,
        rules: vec![vec![]],
        dry_run: false,
    };
    let mut b = State::builder();
    b.namespace(Namespace {
        name: "default".into(),
        ..Namespace::default()
    })
    .unwrap();
    b.policy(deny_all("global", "istio-system", Scope::Global))
        .unwrap();
    b.policy(deny_all("ns-default", "default", Scope::Namespace))
        .unwrap();
    b.policy(deny_all("ns-prod", "prod", Scope::Namespace))
        .unwrap();
    b.policy(deny_all("selected", "default", Scope::WorkloadSelector))
        .unwrap();
    b.policy(deny_all("unselected", "default", Scope::WorkloadSelector))
        .unwrap();
    let mut echo = Workload::new(
        "echo",
        "echo",
        Identity::new("cluster.local", "default", "echo").unwrap(),
    );
    echo.authorization_policies = vec!["default/selected".to_owned()];
    let other = Workload::new(
        "other",
        "other",
        Identity::new("cluster.local", "other", "x").unwrap(),
    );
    let state = b.build();

    let keys =
        |w: &Workload| -> Vec<String> { state.policies_for(w).iter().map(|p| p.key()).collect() };
    assert_eq!(
        keys(&echo),
        [
            "default/ns-default",
            "default/selected",
            "istio-system/global"
        ]
    );
    assert_eq!(keys(&other), ["istio-system/global"]);

    // The first DENY in key order names the policy.
    assert_eq!(
        authorize(&conn(), &echo, &state),
        Decision::Deny {
            policy: Some("default/ns-default".into()),
            reason: DenyReason::DenyPolicyMatched
        }
    );
}

#[test]
fn allow_in_another_namespace_does_not_restrict() {
    let mut b = State::builder();
    b.policy(Authorization {
        name: "only-80".into(),
        namespace: "prod".into(),
        scope: Scope::Namespace,
        action: Action::Allow,
        rules: vec![vec![vec![Match {
            destination_ports: vec![80],
            ..Match::default()
        }]]],
        dry_run: false,
    })
    .unwrap();
    let state = b.build();
    let echo = Workload::new(
        "echo",
        "echo",
        Identity::new("cluster.local", "default", "echo").unwrap(),
    );
    let prod = Workload::new(
        "p",
        "p",
        Identity::new("cluster.local", "prod", "p").unwrap(),
    );
    assert_eq!(authorize(&conn(), &echo, &state), Decision::Allow);
    assert!(!authorize(&conn(), &prod, &state).is_allow());
}
