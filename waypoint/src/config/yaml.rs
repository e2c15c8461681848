//! YAML text to a tree of nodes that remember where they were written.
//!
//! serde-saphyr does the parsing (syntax, anchors, merge keys, budgets); this module only keeps
//! the shape and each node's line and column, so that the typed decoding in `decode` can report
//! every problem of a resource (not just the first) with its field path and position. Nothing
//! here knows about Kubernetes.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A file larger than this is refused before parsing: a few thousand routes fit in a few MiB.
pub const MAX_FILE_BYTES: usize = 16 * 1024 * 1024;

/// Where a node starts, 1-based (0 when the parser did not say).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One YAML node and its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

/// The YAML data model after tag resolution (YAML 1.2 core schema, as serde-saphyr infers it).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    String(String),
    Seq(Vec<Node>),
    /// Keys in the order written; duplicates were refused by the parser.
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// What a message calls this kind of value.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::String(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

impl Node {
    /// The value under `key` when this is a mapping with a string key `key`.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(&k.value, Value::String(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string under `key`, if it is one.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key).map(|n| &n.value) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }
}

/// A syntax error: the file could not be read as YAML at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    pub pos: Option<Pos>,
    pub message: String,
}

/// Parses every document of `text` (documents that are empty or only `null` are skipped, as
/// `kubectl apply` skips them).
pub fn parse_documents(text: &str) -> Result<Vec<Node>, SyntaxError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(SyntaxError {
            pos: None,
            message: format!(
                "{} bytes is more than the {MAX_FILE_BYTES} bytes a config file may have",
                text.len()
            ),
        });
    }
    // Limits tighter than the defaults: route config needs no alias bombs or deep nesting.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 10_000,
            max_depth: 64,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_events: 4_000_000,
        },
        with_snippet: false,
        strict_booleans: true,
    };
    serde_saphyr::from_multiple_with_options::<Node>(text, options).map_err(|e| syntax_error(&e))
}

fn syntax_error(e: &serde_saphyr::Error) -> SyntaxError {
    let pos = e.location().filter(|l| l.line() > 0).map(|l| Pos {
        line: saturate(l.line()),
        column: saturate(l.column()),
    });
    let mut message = e.to_string();
    // The parser's message may end with the position; ours prints it in front already.
    if let Some(p) = pos {
        for suffix in [
            format!(" at line {} column {}", p.line, p.column),
            format!(" at line {}, column {}", p.line, p.column),
        ] {
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_owned();
            }
        }
    }
    SyntaxError { pos, message }
}

fn saturate(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<Value>::deserialize(d)?;
        Ok(Node {
            value: s.value,
            pos: Pos {
                line: saturate(s.referenced.line()),
                column: saturate(s.referenced.column()),
            },
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Value, E> {
        String::from_utf8(v.to_vec())
            .map(Value::String)
            .map_err(|_| E::custom("binary data is not UTF-8"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            items.push(n);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some((k, v)) = map.next_entry::<Node, Node>()? {
            entries.push((k, v));
        }
        Ok(Value::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_keep_positions_and_types() {
        let docs = parse_documents("a: 1\nb:\n  - x\n  - \"2\"\n---\n---\nc: 1.5\nd: true\ne: ~\n")
            .expect("valid YAML");
        assert_eq!(docs.len(), 2, "the empty document is skipped");
        let b = docs[0].get("b").expect("b");
        let Value::Seq(items) = &b.value else {
            panic!("b is a list: {b:?}")
        };
        assert_eq!(items[0].value, Value::String("x".into()));
        assert_eq!(items[0].pos, Pos { line: 3, column: 5 });
        assert_eq!(
            items[1].value,
            Value::String("2".into()),
            "quoted stays a string"
        );
        assert_eq!(docs[0].get("a").map(|n| &n.value), Some(&Value::Int(1)));
        assert_eq!(docs[1].get("c").map(|n| &n.value), Some(&Value::Float(1.5)));
        assert_eq!(docs[1].get("d").map(|n| &n.value), Some(&Value::Bool(true)));
        assert_eq!(docs[1].get("e").map(|n| &n.value), Some(&Value::Null));
        assert_eq!(docs[1].get("c").map(|n| n.pos.line), Some(7));
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let e = parse_documents("a: [1, 2\nb: 3\n").expect_err("unclosed flow list");
        assert!(e.pos.is_some_and(|p| p.line >= 1), "{e:?}");
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let e = parse_documents("a: 1\na: 2\n").expect_err("duplicate key");
        assert_eq!(e.pos.map(|p| p.line), Some(2), "{e:?}");
    }

    #[test]
    fn anchors_and_merge_keys_resolve() {
        let docs = parse_documents("base: &b {x: 1}\nuse:\n  <<: *b\n  y: 2\n").expect("valid");
        let u = docs[0].get("use").expect("use");
        assert_eq!(u.get("x").map(|n| &n.value), Some(&Value::Int(1)));
        assert_eq!(u.get("y").map(|n| &n.value), Some(&Value::Int(2)));
    }
}
