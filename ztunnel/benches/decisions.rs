//! Micro-benchmarks of the decisions taken per connection (issue 13): which workload owns an
//! address, which enrolled pod does, may this connection pass, which endpoint serves it. Pure functions, no I/O.
//!
//! `cargo bench -p ztunnel --bench decisions`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};

use ztunnel::identity::Identity;
use ztunnel::proxy::pod_index::{Addressed, PodIndex};
use ztunnel::state::policy::{Match, StringMatch};
use ztunnel::state::{
    Action, Authorization, ConnectionInfo, Destination, NamespacedHostname, Scope, Service, State,
    Workload, authz, pick_endpoint,
};

/// The n-th address of 10.0.0.0/8.
fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

fn workload(n: u32) -> Workload {
    let id = Identity::new(
        "cluster.local",
        format!("ns-{}", n % 100),
        format!("sa-{n}"),
    )
    .expect("valid identity");
    let mut w = Workload::new(format!("cluster1//v1/Pod/ns/w-{n}"), format!("w-{n}"), id);
    w.workload_ips = vec![ip(n)];
    w.node = format!("node-{}", n % 50);
    w
}

fn workload_by_ip(c: &mut Criterion) {
    const N: u32 = 100_000;
    let mut b = State::builder();
    for n in 0..N {
        b.workload(workload(n)).expect("unique workload");
    }
    let state = b.build();
    let mut i = 0u32;
    c.bench_function("workload_by_ip among 100,000 workloads (hit)", |bench| {
        bench.iter(|| {
            i = (i + 7919) % N;
            black_box(state.workload_by_ip(black_box(ip(i))))
        });
    });
    c.bench_function("workload_by_ip among 100,000 workloads (miss)", |bench| {
        bench.iter(|| black_box(state.workload_by_ip(black_box(ip(N + 1)))));
    });
}

/// An enrolled pod as the pod index sees it.
struct IndexedPod {
    uid: String,
    ips: Vec<IpAddr>,
}

impl Addressed for IndexedPod {
    fn uid(&self) -> &str {
        &self.uid
    }
    fn ips(&self) -> &[IpAddr] {
        &self.ips
    }
}

/// Which enrolled pod of this node owns an address (asked on every outbound connection):
/// the index against the linear scan it replaced, 1,000 pods.
fn pod_by_ip(c: &mut Criterion) {
    const N: u32 = 1_000;
    let mut index = PodIndex::default();
    for n in 0..N {
        index.insert(Arc::new(IndexedPod {
            uid: format!("uid-{n}"),
            ips: vec![ip(n)],
        }));
    }
    let index = std::sync::RwLock::new(index);
    let mut i = 0u32;
    c.bench_function("pod by ip among 1,000 pods (index, hit)", |bench| {
        bench.iter(|| {
            i = (i + 7919) % N;
            let pods = index.read().expect("not poisoned");
            black_box(pods.by_ip(&black_box(ip(i))).cloned())
        });
    });
    c.bench_function("pod by ip among 1,000 pods (index, miss)", |bench| {
        bench.iter(|| {
            let pods = index.read().expect("not poisoned");
            black_box(pods.by_ip(&black_box(ip(N + 1))).cloned())
        });
    });
    c.bench_function("pod by ip among 1,000 pods (linear scan, hit)", |bench| {
        bench.iter(|| {
            i = (i + 7919) % N;
            let wanted = black_box(ip(i));
            let pods = index.read().expect("not poisoned");
            black_box(pods.values().find(|p| p.ips.contains(&wanted)).cloned())
        });
    });
}

/// A policy whose single rule matches one principal.
fn policy(n: u32, action: Action, principal: String) -> Authorization {
    let m = Match {
        principals: vec![StringMatch::Exact(principal)],
        destination_ports: vec![8080],
        ..Match::default()
    };
    Authorization {
        name: format!("p-{n}"),
        namespace: "default".into(),
        scope: Scope::Namespace,
        action,
        rules: vec![vec![vec![m]]],
        dry_run: false,
    }
}

fn authorization(c: &mut Criterion) {
    const N: u32 = 10_000;
    // Worst case: every DENY policy is checked and misses, and only the last ALLOW matches.
    let src = Identity::new("cluster.local", "default", "client").expect("valid identity");
    let mut policies: Vec<Authorization> = (0..N / 2)
        .map(|n| {
            policy(
                n,
                Action::Deny,
                format!("cluster.local/ns/other/sa/deny-{n}"),
            )
        })
        .collect();
    policies.extend((N / 2..N - 1).map(|n| {
        policy(
            n,
            Action::Allow,
            format!("cluster.local/ns/other/sa/allow-{n}"),
        )
    }));
    policies.push(policy(N, Action::Allow, src.principal()));
    let conn = ConnectionInfo {
        src_identity: Some(src),
        src_ip: ip(1),
        dst_ip: ip(2),
        dst_port: 8080,
    };
    assert!(authz::decide(&conn, &policies).is_allow());
    c.bench_function(
        "authz::decide over 10,000 policies (last ALLOW matches)",
        |bench| bench.iter(|| black_box(authz::decide(black_box(&conn), &policies))),
    );

    // The same through the state: policy selection for the destination, then the verdict.
    let mut b = State::builder();
    let dst_id = Identity::new("cluster.local", "default", "server").expect("valid identity");
    let mut dst = Workload::new("uid-dst", "server", dst_id);
    dst.workload_ips = vec![ip(2)];
    b.workload(dst).expect("unique workload");
    for p in policies {
        b.policy(p).expect("unique policy");
    }
    let state = b.build();
    let dst = state.workload_by_ip(ip(2)).expect("destination");
    c.bench_function(
        "authz::authorize over 10,000 policies (selection + verdict)",
        |bench| bench.iter(|| black_box(authz::authorize(black_box(&conn), &dst, &state))),
    );
}

fn load_balancing(c: &mut Criterion) {
    const N: u32 = 1_000;
    let key = NamespacedHostname {
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
    };
    let mut b = State::builder();
    for n in 0..N {
        let mut w = workload(n);
        w.services.insert(key.clone(), BTreeMap::from([(80, 8080)]));
        b.workload(w).expect("unique workload");
    }
    let vip = IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1));
    b.service(Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: key.hostname.clone(),
        vips: vec![vip],
        ports: BTreeMap::from([(80, 8080)]),
        subject_alt_names: Vec::new(),
        app_protocols: Default::default(),
        waypoint: None,
    })
    .expect("unique service");
    let state = b.build();
    let endpoints: Vec<(Arc<Workload>, SocketAddr)> = state
        .workloads()
        .map(|w| (w.clone(), SocketAddr::new(w.workload_ips[0], 8080)))
        .collect();
    let mut seed = 0u64;
    c.bench_function("pick_endpoint over 1,000 endpoints", |bench| {
        bench.iter(|| {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            black_box(pick_endpoint(black_box(&endpoints), seed))
        });
    });
    // What a connection to a service VIP pays before the pick: resolving the VIP builds the
    // list of healthy endpoints.
    let dst = SocketAddr::new(vip, 80);
    c.bench_function("resolve a VIP with 1,000 endpoints, then pick", |bench| {
        bench.iter(|| match state.resolve(black_box(dst)) {
            Destination::Service { endpoints, .. } => {
                black_box(pick_endpoint(&endpoints, 42).map(|(_, a)| *a))
            }
            _ => None,
        });
    });
}

criterion_group!(
    benches,
    workload_by_ip,
    pod_by_ip,
    authorization,
    load_balancing
);
criterion_main!(benches);
