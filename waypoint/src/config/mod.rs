//! Resources as users write them, read from `kubectl apply -f` style files: multi-document
//! YAML (`---`), `kind: List`, a file or a directory of them.
//!
//! The pipeline is `yaml` (text to positioned nodes) → `decode` (nodes to typed resources,
//! every problem recorded with its path) → this module, which files each resource under its
//! name or rejects it. One bad resource never stops the others: it is rejected by name with
//! its errors, and the rest load. Kinds of other API groups (Deployments, Services, ...) in
//! the same files are skipped; kinds of our groups that the waypoint does not read are
//! reported as warnings. Nothing here does I/O except `load_path`.

pub mod base64;
pub mod decode;
pub mod diag;
pub mod duration;
pub mod gateway;
pub mod istio;
pub mod meta;
pub mod security;
pub mod yaml;

use std::path::Path as FsPath;

use decode::{Cx, Fields, Path};
pub use diag::{Diagnostic, Problem, ResourceName, Severity};
pub use meta::ObjectMeta;
use yaml::{Node, Pos};

/// Where a resource was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub file: String,
    /// 1-based document index in the file.
    pub document: usize,
}

/// A resource that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub api_version: String,
    pub meta: ObjectMeta,
    pub source: Source,
    pub spec: Spec,
}

/// The kinds the waypoint reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    VirtualService(istio::VirtualService),
    DestinationRule(Box<istio::DestinationRule>),
    HttpRoute(gateway::HttpRoute),
    /// Read as an HTTPRoute on `/<service>/<method>` paths.
    GrpcRoute(gateway::GrpcRoute),
    AuthorizationPolicy(Box<security::AuthorizationPolicy>),
    RequestAuthentication(Box<security::RequestAuthentication>),
}

impl Spec {
    pub fn kind(&self) -> &'static str {
        match self {
            Spec::VirtualService(_) => "VirtualService",
            Spec::DestinationRule(_) => "DestinationRule",
            Spec::HttpRoute(_) => "HTTPRoute",
            Spec::GrpcRoute(_) => "GRPCRoute",
            Spec::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Spec::RequestAuthentication(_) => "RequestAuthentication",
        }
    }
}

impl Resource {
    pub fn name(&self) -> ResourceName {
        ResourceName {
            kind: self.spec.kind().into(),
            namespace: self.meta.namespace.clone(),
            name: self.meta.name.clone(),
        }
    }
}

/// How files are read.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The namespace of resources that name none (kubectl's current namespace).
    pub default_namespace: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            default_namespace: "default".into(),
        }
    }
}

/// What loading produced: the accepted resources and everything found on the way.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub resources: Vec<Resource>,
    pub diagnostics: Vec<Diagnostic>,
    /// Resources refused because of an error (the diagnostics say why).
    pub rejected: Vec<ResourceName>,
    /// Resources of other API groups, not for the waypoint.
    pub skipped: usize,
}

impl Loaded {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }
    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }
    fn extend(&mut self, other: Loaded) {
        self.resources.extend(other.resources);
        self.diagnostics.extend(other.diagnostics);
        self.rejected.extend(other.rejected);
        self.skipped += other.skipped;
    }
    /// A resource defined twice: the later definition wins, as a second `kubectl apply` would.
    fn dedupe(&mut self) {
        let mut keep: Vec<Resource> = Vec::with_capacity(self.resources.len());
        for r in std::mem::take(&mut self.resources) {
            if let Some(i) = keep.iter().position(|k| k.name() == r.name()) {
                let old = keep.remove(i);
                self.diagnostics.push(Diagnostic {
                    file: r.source.file.clone(),
                    document: r.source.document,
                    resource: Some(r.name()),
                    path: String::new(),
                    pos: None,
                    problem: Problem::Note(format!(
                        "defined again: this definition replaces the one in {} document {}",
                        old.source.file, old.source.document
                    )),
                });
            }
            keep.push(r);
        }
        self.resources = keep;
    }
}

/// Reads a file, or every `.yaml`, `.yml` and `.json` file of a directory (sorted by name,
/// not recursive, as `kubectl apply -f DIR`).
pub fn load_path(path: &FsPath, opts: &LoadOptions) -> Loaded {
    let mut out = Loaded::default();
    let file_error = |file: String, message: String| Diagnostic {
        file,
        document: 0,
        resource: None,
        path: String::new(),
        pos: None,
        problem: Problem::Invalid(message),
    };
    let mut files = Vec::new();
    if path.is_dir() {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                for e in entries.flatten() {
                    let p = e.path();
                    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
                    if p.is_file() && matches!(ext, "yaml" | "yml" | "json") {
                        files.push(p);
                    }
                }
            }
            Err(e) => {
                out.diagnostics.push(file_error(
                    path.display().to_string(),
                    format!("cannot read: {e}"),
                ));
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    for p in files {
        let file = p.display().to_string();
        match std::fs::metadata(&p) {
            Ok(m) if m.len() > yaml::MAX_FILE_BYTES as u64 => {
                out.diagnostics.push(file_error(
                    file,
                    format!(
                        "{} bytes is more than the {} bytes a config file may have",
                        m.len(),
                        yaml::MAX_FILE_BYTES
                    ),
                ));
                continue;
            }
            _ => {}
        }
        match std::fs::read_to_string(&p) {
            Ok(text) => out.extend(load_file_text(&file, &text, opts)),
            Err(e) => out
                .diagnostics
                .push(file_error(file, format!("cannot read: {e}"))),
        }
    }
    out.dedupe();
    out
}

/// Reads the text of one file; `file` is the name messages carry.
pub fn load_str(file: &str, text: &str, opts: &LoadOptions) -> Loaded {
    let mut out = load_file_text(file, text, opts);
    out.dedupe();
    out
}

/// Decodes one parsed document (a single resource, not a `List`) the way the files are read:
/// the entry the Kubernetes API source uses for each object it is sent.
pub fn load_document(src: &Source, node: &Node, opts: &LoadOptions) -> Loaded {
    let mut out = Loaded::default();
    resource(src, node, &Path::Root, opts, &mut out);
    out
}

fn load_file_text(file: &str, text: &str, opts: &LoadOptions) -> Loaded {
    let mut out = Loaded::default();
    let docs = match yaml::parse_documents(text) {
        Ok(d) => d,
        Err(e) => {
            out.diagnostics.push(Diagnostic {
                file: file.into(),
                document: 0,
                resource: None,
                path: String::new(),
                pos: e.pos,
                problem: Problem::Invalid(format!("not valid YAML: {}", e.message)),
            });
            return out;
        }
    };
    for (i, doc) in docs.iter().enumerate() {
        let src = Source {
            file: file.into(),
            document: i + 1,
        };
        let root = Path::Root;
        if doc.get_str("kind") == Some("List") && doc.get_str("apiVersion") == Some("v1") {
            let items = Path::Field(&root, "items");
            match doc.get("items").map(|n| &n.value) {
                Some(yaml::Value::Seq(list)) => {
                    for (j, item) in list.iter().enumerate() {
                        resource(&src, item, &items.index(j), opts, &mut out);
                    }
                }
                Some(yaml::Value::Null) | None => {}
                Some(_) => out.diagnostics.push(Diagnostic {
                    file: file.into(),
                    document: i + 1,
                    resource: None,
                    path: "items".into(),
                    pos: Some(doc.pos),
                    problem: Problem::Invalid("items must be a list".into()),
                }),
            }
        } else {
            resource(&src, doc, &root, opts, &mut out);
        }
    }
    out
}

enum Kind {
    VirtualService,
    DestinationRule,
    HttpRoute,
    GrpcRoute,
    AuthorizationPolicy,
    RequestAuthentication,
}

/// Which of our kinds `api_version`/`kind` is; `Err` says why not (`None`: another group).
fn classify(api_version: &str, kind: &str) -> Result<Kind, Option<Problem>> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let served = |versions: &[&str]| {
        if versions.contains(&version) {
            Ok(())
        } else {
            Err(Some(Problem::Invalid(format!(
                "{api_version} is not served for {kind} (versions: {})",
                versions.join(", ")
            ))))
        }
    };
    match (group, kind) {
        (istio::GROUP, "VirtualService") => served(&istio::VERSIONS).map(|_| Kind::VirtualService),
        (istio::GROUP, "DestinationRule") => {
            served(&istio::VERSIONS).map(|_| Kind::DestinationRule)
        }
        (gateway::GROUP, "HTTPRoute") => {
            served(&gateway::HTTP_ROUTE_VERSIONS).map(|_| Kind::HttpRoute)
        }
        (gateway::GROUP, "GRPCRoute") => served(&["v1"]).map(|_| Kind::GrpcRoute),
        (istio::GROUP | gateway::GROUP, _) => Err(Some(Problem::UnsupportedKind {
            kind: kind.into(),
            note: "skipped",
        })),
        (security::GROUP, "AuthorizationPolicy") => {
            served(&security::VERSIONS).map(|_| Kind::AuthorizationPolicy)
        }
        (security::GROUP, "RequestAuthentication") => {
            served(&security::VERSIONS).map(|_| Kind::RequestAuthentication)
        }
        _ => Err(None),
    }
}

fn resource(src: &Source, node: &Node, at: &Path<'_>, opts: &LoadOptions, out: &mut Loaded) {
    let meta = node.get("metadata");
    let name = ResourceName {
        kind: node.get_str("kind").unwrap_or_default().into(),
        namespace: meta
            .and_then(|m| m.get_str("namespace"))
            .unwrap_or(&opts.default_namespace)
            .into(),
        name: meta
            .and_then(|m| m.get_str("name"))
            .unwrap_or_default()
            .into(),
    };
    let diag = |path: String, pos: Pos, problem: Problem| Diagnostic {
        file: src.file.clone(),
        document: src.document,
        resource: Some(name.clone()),
        path,
        pos: Some(pos),
        problem,
    };
    let (Some(api_version), Some(kind)) = (node.get_str("apiVersion"), node.get_str("kind")) else {
        out.diagnostics.push(diag(
            at.to_string(),
            node.pos,
            Problem::Invalid("not a Kubernetes resource: apiVersion and kind are required".into()),
        ));
        out.rejected.push(name);
        return;
    };
    let which = match classify(api_version, kind) {
        Ok(k) => k,
        Err(None) => {
            out.skipped += 1;
            return;
        }
        Err(Some(p)) => {
            let rejected = p.severity() == Severity::Error;
            out.diagnostics
                .push(diag(at.field("apiVersion").to_string(), node.pos, p));
            if rejected {
                out.rejected.push(name);
            } else {
                out.skipped += 1;
            }
            return;
        }
    };
    let mut cx = Cx::default();
    let spec = (|| {
        let mut f = Fields::new(node, at, &mut cx)?;
        f.ignore("apiVersion");
        f.ignore("kind");
        f.ignore("status");
        let meta = f.req_with("metadata", &mut cx, |n, at, cx| {
            ObjectMeta::decode(n, at, cx, &opts.default_namespace)
        });
        let spec = match which {
            Kind::VirtualService => f.req("spec", &mut cx).map(Spec::VirtualService),
            Kind::DestinationRule => f
                .req::<istio::DestinationRule>("spec", &mut cx)
                .map(|d| Spec::DestinationRule(Box::new(d))),
            Kind::HttpRoute => f.req("spec", &mut cx).map(Spec::HttpRoute),
            Kind::GrpcRoute => f.req("spec", &mut cx).map(Spec::GrpcRoute),
            // No spec is Istio's allow-nothing policy, as `spec: {}` is.
            Kind::AuthorizationPolicy => Some(Spec::AuthorizationPolicy(Box::new(
                f.opt::<security::AuthorizationPolicy>("spec", &mut cx)
                    .unwrap_or_default(),
            ))),
            // No spec (or no jwtRules) verifies nothing, as in Istio.
            Kind::RequestAuthentication => Some(Spec::RequestAuthentication(Box::new(
                f.opt::<security::RequestAuthentication>("spec", &mut cx)
                    .unwrap_or_default(),
            ))),
        };
        let ok = f.finish(&mut cx);
        Some((meta?, spec?)).filter(|_| ok)
    })();
    let failed = cx.has_errors() || spec.is_none();
    let mut findings = cx.findings;
    findings.sort_by_key(|f| (f.pos.line, f.pos.column));
    for finding in findings {
        out.diagnostics
            .push(diag(finding.path, finding.pos, finding.problem));
    }
    match spec {
        Some((meta, spec)) if !failed => out.resources.push(Resource {
            api_version: api_version.into(),
            meta,
            source: src.clone(),
            spec,
        }),
        _ => out.rejected.push(name),
    }
}

#[cfg(test)]
mod tests;
