//! What the config loader says about its input: errors that reject a resource, warnings that
//! do not. Each names the file, the document, the resource and the field path, so a user can
//! find the line without reading our code.

use std::fmt;

use super::yaml::Pos;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The resource is accepted; something in it has no effect (yet).
    Warning,
    /// The resource is rejected; the others in the file still load.
    Error,
}

/// One problem in a resource, before it is given its file and resource.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("unknown field")]
    UnknownField,
    #[error("required field is missing")]
    Missing,
    #[error("expected {expected}, found {found}")]
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("accepted, not implemented: {0}")]
    NotImplemented(&'static str),
    /// Accepted, but probably not what was meant (a subset no DestinationRule defines, a
    /// host defined twice).
    #[error("{0}")]
    Note(String),
    #[error("deprecated: {0}")]
    Deprecated(&'static str),
    #[error("{kind} is not a resource the waypoint reads ({note})")]
    UnsupportedKind { kind: String, note: &'static str },
}

impl Problem {
    /// Whether this problem rejects the resource.
    pub fn severity(&self) -> Severity {
        match self {
            Problem::NotImplemented(_)
            | Problem::Note(_)
            | Problem::Deprecated(_)
            | Problem::UnsupportedKind { .. } => Severity::Warning,
            Problem::UnknownField
            | Problem::Missing
            | Problem::WrongType { .. }
            | Problem::Invalid(_) => Severity::Error,
        }
    }
}

/// A resource as a message names it: `VirtualService default/reviews`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceName {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.kind.is_empty() {
            "resource"
        } else {
            &self.kind
        };
        let name = if self.name.is_empty() {
            "<unnamed>"
        } else {
            &self.name
        };
        write!(f, "{kind} {}/{name}", self.namespace)
    }
}

/// A finding with everything a user needs to locate it.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based index of the YAML document in the file (empty documents are not counted).
    pub document: usize,
    /// The resource, once its kind and metadata could be read.
    pub resource: Option<ResourceName>,
    /// Dotted field path from the document root: `spec.http[0].retries.retryOn`.
    pub path: String,
    pub pos: Option<Pos>,
    pub problem: Problem,
}

impl Diagnostic {
    /// `problem` at field `path` of a resource already read (compile findings: no position).
    pub fn about(res: &super::Resource, path: &str, problem: Problem) -> Diagnostic {
        Diagnostic {
            file: res.source.file.clone(),
            document: res.source.document,
            resource: Some(res.name()),
            path: path.into(),
            pos: None,
            problem,
        }
    }

    pub fn severity(&self) -> Severity {
        self.problem.severity()
    }
    pub fn is_error(&self) -> bool {
        self.severity() == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity() {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}", self.file)?;
        if let Some(p) = self.pos {
            write!(f, ":{p}")?;
        }
        write!(f, ": {level}: document {}", self.document)?;
        if let Some(r) = &self.resource {
            write!(f, ", {r}")?;
        }
        if !self.path.is_empty() {
            write!(f, ", {}", self.path)?;
        }
        write!(f, ": {}", self.problem)
    }
}
