//! JSON objects from the API server as the YAML tree the config decoder reads, so the
//! Kubernetes source and the files go through one decoder. JSON has no positions: every
//! node is at 0:0, and the source drops positions from its messages.

use serde_json::Value as Json;

use crate::config::yaml::{Node, Pos, Value};

/// The same data as a positionless [`Node`].
pub fn to_node(json: &Json) -> Node {
    let value = match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i128::from(i)),
            (None, Some(u)) => Value::Int(i128::from(u)),
            (None, None) => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(s.clone()),
        Json::Array(items) => Value::Seq(items.iter().map(to_node).collect()),
        Json::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| (at_zero(Value::String(k.clone())), to_node(v)))
                .collect(),
        ),
    };
    at_zero(value)
}

fn at_zero(value: Value) -> Node {
    Node {
        value,
        pos: Pos::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_json_type_has_its_yaml_counterpart() {
        let json = serde_json::json!({
            "s": "x", "i": -3, "u": u64::MAX, "f": 1.5, "b": true, "n": null, "l": [1, "a"]
        });
        let node = to_node(&json);
        assert_eq!(node.get_str("s"), Some("x"));
        assert_eq!(node.get("i").map(|n| &n.value), Some(&Value::Int(-3)));
        assert_eq!(
            node.get("u").map(|n| &n.value),
            Some(&Value::Int(i128::from(u64::MAX)))
        );
        assert_eq!(node.get("f").map(|n| &n.value), Some(&Value::Float(1.5)));
        assert_eq!(node.get("b").map(|n| &n.value), Some(&Value::Bool(true)));
        assert_eq!(node.get("n").map(|n| &n.value), Some(&Value::Null));
        match node.get("l").map(|n| &n.value) {
            Some(Value::Seq(items)) => assert_eq!(items.len(), 2),
            other => panic!("not a list: {other:?}"),
        }
    }
}
