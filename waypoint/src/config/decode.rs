//! Typed decoding of a YAML node tree, collecting every problem with its field path.
//!
//! serde's derive stops at the first error and cannot warn; this small decoder instead walks
//! a mapping field by field (`Fields`), records each unknown field, wrong type or invalid value
//! with the path and position where it was written, and goes on, so that one pass over a
//! resource reports all that is wrong with it. Fields that are accepted but have no effect yet
//! are recorded as warnings through `Fields::not_implemented`.

use std::collections::BTreeMap;
use std::fmt;

use super::diag::{Problem, Severity};
use super::yaml::{Node, Pos, Value};

/// A field path, built on the stack as the decoder descends (no allocation until printed).
#[derive(Clone, Copy)]
pub enum Path<'a> {
    Root,
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl<'a> Path<'a> {
    pub fn field(&'a self, name: &'a str) -> Path<'a> {
        Path::Field(self, name)
    }
    pub fn index(&'a self, i: usize) -> Path<'a> {
        Path::Index(self, i)
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Field(parent, name) => {
                if matches!(parent, Path::Root) {
                    f.write_str(name)
                } else {
                    write!(f, "{parent}.{name}")
                }
            }
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// A problem found at a path.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub path: String,
    pub pos: Pos,
    pub problem: Problem,
}

/// The decoding context: what has been found so far.
#[derive(Default, Debug)]
pub struct Cx {
    pub findings: Vec<Finding>,
}

impl Cx {
    pub fn report(&mut self, at: &Path<'_>, pos: Pos, problem: Problem) {
        self.findings.push(Finding {
            path: at.to_string(),
            pos,
            problem,
        });
    }
    pub fn invalid(&mut self, at: &Path<'_>, node: &Node, why: impl Into<String>) {
        self.report(at, node.pos, Problem::Invalid(why.into()));
    }
    pub fn has_errors(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.problem.severity() == Severity::Error)
    }
    fn wrong_type(&mut self, at: &Path<'_>, node: &Node, expected: &'static str) {
        self.report(
            at,
            node.pos,
            Problem::WrongType {
                expected,
                found: node.value.kind(),
            },
        );
    }
}

/// A type read from a node. `None` means the node was wrong and the problem is recorded.
pub trait Decode: Sized {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self>;
}

impl Decode for String {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        match &node.value {
            Value::String(s) => Some(s.clone()),
            _ => {
                cx.wrong_type(at, node, "a string (quote numbers and booleans)");
                None
            }
        }
    }
}

impl Decode for bool {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        match node.value {
            Value::Bool(b) => Some(b),
            _ => {
                cx.wrong_type(at, node, "a boolean");
                None
            }
        }
    }
}

macro_rules! decode_int {
    ($($t:ty),*) => {$(
        impl Decode for $t {
            fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
                match node.value {
                    Value::Int(i) => match <$t>::try_from(i) {
                        Ok(v) => Some(v),
                        Err(_) => {
                            cx.invalid(at, node, format!(
                                "{i} is out of range ({}..={})", <$t>::MIN, <$t>::MAX));
                            None
                        }
                    },
                    _ => {
                        cx.wrong_type(at, node, "an integer");
                        None
                    }
                }
            }
        }
    )*};
}
decode_int!(u16, u32, i32, i64, u64);

impl Decode for f64 {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        match node.value {
            // Integers this large are not percentages or weights; precision loss is moot.
            #[allow(clippy::cast_precision_loss)]
            Value::Int(i) => Some(i as f64),
            Value::Float(f) if f.is_finite() => Some(f),
            _ => {
                cx.wrong_type(at, node, "a number");
                None
            }
        }
    }
}

impl<T: Decode> Decode for Vec<T> {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        match &node.value {
            Value::Null => Some(Vec::new()),
            Value::Seq(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match T::decode(item, &at.index(i), cx) {
                        Some(v) => out.push(v),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            _ => {
                cx.wrong_type(at, node, "a list");
                None
            }
        }
    }
}

impl<T: Decode> Decode for BTreeMap<String, T> {
    fn decode(node: &Node, at: &Path<'_>, cx: &mut Cx) -> Option<Self> {
        match &node.value {
            Value::Null => Some(BTreeMap::new()),
            Value::Map(entries) => {
                let mut out = BTreeMap::new();
                let mut ok = true;
                for (k, v) in entries {
                    let Value::String(key) = &k.value else {
                        cx.wrong_type(at, k, "a string key");
                        ok = false;
                        continue;
                    };
                    match T::decode(v, &at.field(key), cx) {
                        Some(v) => {
                            out.insert(key.clone(), v);
                        }
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            _ => {
                cx.wrong_type(at, node, "a mapping");
                None
            }
        }
    }
}

/// The fields of one mapping, taken one by one; whatever is left is unknown.
pub struct Fields<'n, 'p> {
    node: &'n Node,
    entries: &'n [(Node, Node)],
    taken: Vec<bool>,
    at: &'p Path<'p>,
    ok: bool,
}

impl<'n, 'p> Fields<'n, 'p> {
    /// `None` (and a problem) when `node` is not a mapping; `null` reads as an empty mapping.
    pub fn new(node: &'n Node, at: &'p Path<'p>, cx: &mut Cx) -> Option<Self> {
        let entries: &[(Node, Node)] = match &node.value {
            Value::Map(e) => e,
            Value::Null => &[],
            _ => {
                cx.wrong_type(at, node, "a mapping");
                return None;
            }
        };
        Some(Fields {
            node,
            entries,
            taken: vec![false; entries.len()],
            at,
            ok: true,
        })
    }

    /// The position of the mapping itself.
    pub fn pos(&self) -> Pos {
        self.node.pos
    }

    pub fn path(&self) -> &'p Path<'p> {
        self.at
    }

    /// The raw node under `key` (null counts as absent), marked as known.
    pub fn node(&mut self, key: &str) -> Option<&'n Node> {
        let i = self
            .entries
            .iter()
            .position(|(k, _)| matches!(&k.value, Value::String(s) if s == key))?;
        self.taken[i] = true;
        let v = &self.entries[i].1;
        (!matches!(v.value, Value::Null)).then_some(v)
    }

    /// Whether `key` is set (present and not null), without reading it.
    pub fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, v)| {
            matches!(&k.value, Value::String(s) if s == key) && !matches!(v.value, Value::Null)
        })
    }

    /// An optional field decoded with `T::decode`.
    pub fn opt<T: Decode>(&mut self, key: &str, cx: &mut Cx) -> Option<T> {
        self.opt_with(key, cx, T::decode)
    }

    /// An optional field decoded with `f`.
    pub fn opt_with<T>(
        &mut self,
        key: &str,
        cx: &mut Cx,
        f: impl FnOnce(&Node, &Path<'_>, &mut Cx) -> Option<T>,
    ) -> Option<T> {
        let n = self.node(key)?;
        let v = f(n, &self.at.field(key), cx);
        if v.is_none() {
            self.ok = false;
        }
        v
    }

    /// A list field; absent is empty.
    pub fn list<T: Decode>(&mut self, key: &str, cx: &mut Cx) -> Vec<T> {
        self.opt(key, cx).unwrap_or_default()
    }

    /// A map field; absent is empty.
    pub fn map<T: Decode>(&mut self, key: &str, cx: &mut Cx) -> BTreeMap<String, T> {
        self.opt(key, cx).unwrap_or_default()
    }

    /// A required field.
    pub fn req<T: Decode>(&mut self, key: &str, cx: &mut Cx) -> Option<T> {
        self.req_with(key, cx, T::decode)
    }

    pub fn req_with<T>(
        &mut self,
        key: &str,
        cx: &mut Cx,
        f: impl FnOnce(&Node, &Path<'_>, &mut Cx) -> Option<T>,
    ) -> Option<T> {
        if self.node(key).is_none() {
            cx.report(&self.at.field(key), self.node.pos, Problem::Missing);
            self.ok = false;
            return None;
        }
        self.opt_with(key, cx, f)
    }

    /// A field the API defines that has no effect here yet: a warning when it is set.
    pub fn not_implemented(&mut self, key: &str, cx: &mut Cx, what: &'static str) {
        if let Some(n) = self.node(key) {
            cx.report(&self.at.field(key), n.pos, Problem::NotImplemented(what));
        }
    }

    /// A field the API defines that never changes what the waypoint does (informational,
    /// or written by controllers): accepted silently.
    pub fn ignore(&mut self, key: &str) {
        let _ = self.node(key);
    }

    /// Records a problem at a field of this mapping and marks the mapping as wrong.
    pub fn invalid(&mut self, key: &str, cx: &mut Cx, why: impl Into<String>) {
        let pos = self.lookup_pos(key);
        cx.report(&self.at.field(key), pos, Problem::Invalid(why.into()));
        self.ok = false;
    }

    fn lookup_pos(&self, key: &str) -> Pos {
        self.entries
            .iter()
            .find(|(k, _)| matches!(&k.value, Value::String(s) if s == key))
            .map_or(self.node.pos, |(_, v)| v.pos)
    }

    /// Reports every field not taken as unknown; `true` when nothing in this mapping was wrong.
    pub fn finish(self, cx: &mut Cx) -> bool {
        let mut ok = self.ok;
        for ((k, _), taken) in self.entries.iter().zip(&self.taken) {
            if !taken {
                let name = match &k.value {
                    Value::String(s) => s.as_str(),
                    _ => "<non-string key>",
                };
                cx.report(&self.at.field(name), k.pos, Problem::UnknownField);
                ok = false;
            }
        }
        ok
    }
}

/// Decodes a list whose items are read with `item`.
pub fn list_of<T>(
    node: &Node,
    at: &Path<'_>,
    cx: &mut Cx,
    item: fn(&Node, &Path<'_>, &mut Cx) -> Option<T>,
) -> Option<Vec<T>> {
    let items = match &node.value {
        Value::Seq(items) => items,
        Value::Null => return Some(Vec::new()),
        _ => {
            cx.report(
                at,
                node.pos,
                Problem::WrongType {
                    expected: "a list",
                    found: node.value.kind(),
                },
            );
            return None;
        }
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, n) in items.iter().enumerate() {
        match item(n, &at.index(i), cx) {
            Some(v) => out.push(v),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// At most one of the `keys` may be set (a protobuf `oneof`); reports when more are.
pub fn at_most_one(f: &mut Fields<'_, '_>, cx: &mut Cx, keys: &[&str], set: &[bool]) -> bool {
    let n = set.iter().filter(|s| **s).count();
    if n > 1 {
        let names: Vec<&str> = keys
            .iter()
            .zip(set)
            .filter(|(_, s)| **s)
            .map(|(k, _)| *k)
            .collect();
        let first = names.first().copied().unwrap_or_default();
        f.invalid(
            first,
            cx,
            format!("only one of {} may be set", names.join(", ")),
        );
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::yaml::parse_documents;

    fn doc(text: &str) -> Node {
        parse_documents(text)
            .expect("valid YAML")
            .into_iter()
            .next()
            .expect("one document")
    }

    #[test]
    fn unknown_fields_are_all_reported_with_paths() {
        let n = doc("spec:\n  a: 1\n  typo: 2\n  other: 3\n");
        let mut cx = Cx::default();
        let root = Path::Root;
        let mut top = Fields::new(&n, &root, &mut cx).expect("mapping");
        let spec = top.node("spec").expect("spec");
        let at = root.field("spec");
        let mut f = Fields::new(spec, &at, &mut cx).expect("mapping");
        assert_eq!(f.opt::<u32>("a", &mut cx), Some(1));
        assert!(!f.finish(&mut cx));
        assert!(top.finish(&mut cx));
        let paths: Vec<_> = cx
            .findings
            .iter()
            .map(|f| (f.path.as_str(), f.pos.line))
            .collect();
        assert_eq!(paths, [("spec.typo", 3), ("spec.other", 4)]);
        assert!(
            cx.findings
                .iter()
                .all(|f| f.problem == Problem::UnknownField)
        );
    }

    #[test]
    fn wrong_types_and_ranges_name_the_field() {
        let n = doc("port: 70000\nname: 5\nlist: [a, 1]\n");
        let mut cx = Cx::default();
        let root = Path::Root;
        let mut f = Fields::new(&n, &root, &mut cx).expect("mapping");
        assert_eq!(f.opt::<u16>("port", &mut cx), None);
        assert_eq!(f.opt::<String>("name", &mut cx), None);
        assert_eq!(f.opt::<Vec<String>>("list", &mut cx), None);
        assert!(!f.finish(&mut cx));
        let paths: Vec<_> = cx.findings.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["port", "name", "list[1]"]);
        assert!(matches!(cx.findings[0].problem, Problem::Invalid(ref m) if m.contains("70000")));
        assert!(matches!(
            cx.findings[1].problem,
            Problem::WrongType {
                found: "an integer",
                ..
            }
        ));
    }

    #[test]
    fn missing_required_and_not_implemented() {
        let n = doc("statPrefix: x\n");
        let mut cx = Cx::default();
        let root = Path::Root;
        let mut f = Fields::new(&n, &root, &mut cx).expect("mapping");
        assert_eq!(f.req::<String>("host", &mut cx), None);
        f.not_implemented("statPrefix", &mut cx, "stat prefixes");
        assert!(!f.finish(&mut cx));
        assert_eq!(cx.findings[0].problem, Problem::Missing);
        assert_eq!(cx.findings[0].path, "host");
        assert_eq!(cx.findings[1].problem.severity(), Severity::Warning);
        assert_eq!(cx.findings[1].path, "statPrefix");
    }
}
