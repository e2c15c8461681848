//! Builds the route table from validated resources, once per config. Problems found here
//! (a retry condition Envoy does not know, weights that add up to 0, a host two resources
//! claim) are reported like the loader's, by resource and field path; a resource with an
//! error is left out whole, and the others are compiled.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::config::istio::VirtualService;
use crate::config::{Diagnostic, Problem, Resource, ResourceName, Spec};

use super::hosts::{Subsets, exported, resolve};
use super::table::{Route, RouteSource, RouteTable, ServiceRoutes};

/// What compiling needs to know about the mesh.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// The cluster's DNS domain (`cluster.local`).
    pub domain_suffix: String,
    /// Istio's root namespace: its DestinationRules apply mesh-wide (`istio-system`).
    pub root_namespace: String,
    /// The waypoint's own namespace. As for any Istio proxy, `exportTo` is read against it:
    /// a VirtualService or DestinationRule not exported there is not used.
    pub namespace: String,
    /// The name of the waypoint's Gateway (in `namespace`): what an AuthorizationPolicy's
    /// `targetRefs` name to apply to every request through this waypoint.
    pub gateway_name: String,
    /// The GatewayClass of that Gateway, when it was read from the API (`--kube`): a
    /// root-namespace policy targeting this class applies here too, besides
    /// `istio-waypoint`.
    pub gateway_class: Option<String>,
    /// Workloads carry only the labels Istio's workload API gives (`app` and `version`,
    /// from the canonical name and revision): subsets selecting others are reported.
    pub canonical_labels_only: bool,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            namespace: "default".into(),
            gateway_name: "waypoint".into(),
            gateway_class: None,
            canonical_labels_only: false,
        }
    }
}

/// The table and what was found while building it.
#[derive(Debug, Default)]
pub struct Compiled {
    pub table: RouteTable,
    pub diagnostics: Vec<Diagnostic>,
    pub rejected: Vec<ResourceName>,
}

/// Marks a resource that cannot be compiled; its error is already recorded.
#[derive(Debug)]
pub(super) struct Rejected;

pub(super) struct Compiler<'c> {
    pub(super) opts: &'c CompileOptions,
    pub(super) subsets: Subsets<'c>,
    resources: &'c [Resource],
    diagnostics: Vec<Diagnostic>,
    rejected: Vec<ResourceName>,
    hosts: HashSet<Arc<str>>,
}

impl<'c> Compiler<'c> {
    /// A warning about `res`.
    pub(super) fn note(&mut self, res: &Resource, path: &str, problem: Problem) {
        self.diagnostics.push(Diagnostic::about(res, path, problem));
    }

    /// An error that leaves `res` out.
    pub(super) fn reject(&mut self, res: &Resource, path: &str, problem: Problem) -> Rejected {
        self.diagnostics.push(Diagnostic::about(res, path, problem));
        if !self.rejected.contains(&res.name()) {
            self.rejected.push(res.name());
        }
        Rejected
    }

    /// `res` is left out because a resource it depends on was.
    pub(super) fn reject_also(&mut self, res: &Resource, _: Rejected) -> Rejected {
        self.reject(
            res,
            "",
            Problem::Invalid("a delegate it uses has an error".into()),
        )
    }

    /// One shared copy of each host name.
    pub(super) fn intern(&mut self, host: String) -> Arc<str> {
        if let Some(h) = self.hosts.get(host.as_str()) {
            return h.clone();
        }
        let h: Arc<str> = host.into();
        self.hosts.insert(h.clone());
        h
    }

    pub(super) fn virtual_service(
        &self,
        ns: &str,
        name: &str,
    ) -> Option<(&'c Resource, &'c VirtualService)> {
        self.resources.iter().find_map(|r| match &r.spec {
            Spec::VirtualService(vs) if r.meta.namespace == ns && r.meta.name == name => {
                Some((r, vs))
            }
            _ => None,
        })
    }
}

/// Oldest first (resources without a timestamp after those with one), then by
/// `namespace/name`: the order Istio and Gateway API use to break ties.
pub(super) fn age_then_name(a: &Resource, b: &Resource) -> Ordering {
    let age = match (&a.meta.creation_timestamp, &b.meta.creation_timestamp) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    age.then_with(|| a.meta.namespace.cmp(&b.meta.namespace))
        .then_with(|| a.meta.name.cmp(&b.meta.name))
}

/// The labels a workload from Istio's workload API has.
const CANONICAL_LABELS: [&str; 4] = [
    "app",
    "version",
    "service.istio.io/canonical-name",
    "service.istio.io/canonical-revision",
];

fn report_unmatchable_subsets(c: &mut Compiler<'_>, resources: &[Resource]) {
    for res in resources {
        let Spec::DestinationRule(dr) = &res.spec else {
            continue;
        };
        for (i, subset) in dr.subsets.iter().enumerate() {
            for key in subset.labels.keys() {
                if !CANONICAL_LABELS.contains(&key.as_str()) {
                    c.note(
                        res,
                        &format!("spec.subsets[{i}].labels.{key}"),
                        Problem::NotImplemented(
                            "labels other than app and version with workloads from istiod (its workload API carries no others): no endpoint matches",
                        ),
                    );
                }
            }
        }
    }
}

/// Compiles every route resource of `resources` into one table.
pub fn compile(resources: &[Resource], opts: &CompileOptions) -> Compiled {
    let mut c = Compiler {
        opts,
        subsets: Subsets::new(resources, &opts.root_namespace, &opts.domain_suffix),
        resources,
        diagnostics: Vec::new(),
        rejected: Vec::new(),
        hosts: HashSet::new(),
    };
    if opts.canonical_labels_only {
        report_unmatchable_subsets(&mut c, resources);
    }
    // Service host -> (routes, where they came from, who defined them).
    let mut services: HashMap<String, (Vec<Route>, RouteSource, ResourceName)> = HashMap::new();
    for (host, (routes, owner)) in super::compile_gateway::routes(&mut c, resources) {
        services.insert(host, (routes, RouteSource::HttpRoute, owner));
    }
    for (res, vs) in super::compile_istio::mesh_virtual_services(resources) {
        if !exported(&vs.export_to, &res.meta.namespace, &opts.namespace) {
            c.note(
                res,
                "spec.exportTo",
                Problem::Note(format!(
                    "not exported to the waypoint's namespace {}, so this waypoint does not use it",
                    opts.namespace
                )),
            );
            continue;
        }
        let Ok(routes) = super::compile_istio::routes(&mut c, res, vs) else {
            continue;
        };
        for (i, h) in vs.hosts.iter().enumerate() {
            let host = resolve(h, &res.meta.namespace, &opts.domain_suffix);
            if let Some((_, source, owner)) = services.get(&host) {
                let why = match source {
                    RouteSource::HttpRoute => format!(
                        "{owner} routes {host}; HTTPRoutes take precedence, so this VirtualService is not used for it"
                    ),
                    RouteSource::VirtualService => format!(
                        "{owner} also defines {host} and is older (or first by namespace/name), so it is used (IST0109: merge the two)"
                    ),
                };
                c.note(res, &format!("spec.hosts[{i}]"), Problem::Note(why));
                continue;
            }
            services.insert(
                host,
                (routes.clone(), RouteSource::VirtualService, res.name()),
            );
        }
    }
    let mut table = RouteTable {
        authz: crate::policy::authz::compile(resources, opts, &mut c.diagnostics, &mut c.rejected),
        authn: crate::policy::jwt::compile(resources, opts, &mut c.diagnostics, &mut c.rejected),
        ..RouteTable::default()
    };
    for (host, (routes, source, _)) in services {
        let sr = ServiceRoutes::new(routes, source);
        if host == "*" {
            table.wildcard.push(("".into(), sr));
        } else if let Some(suffix) = host.strip_prefix('*') {
            table.wildcard.push((suffix.into(), sr));
        } else {
            table.exact.insert(host.into(), sr);
        }
    }
    table
        .wildcard
        .sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    Compiled {
        table,
        diagnostics: c.diagnostics,
        rejected: c.rejected,
    }
}
