//! JSON Schema (as OpenAI clients write it for `parameters` and `response_format`) → the
//! OpenAPI-3.0 subset Gemini's `Schema` accepts.
//!
//! Gemini rejects the whole request on any key its `Schema` message does not know
//! (`additionalProperties`, `$schema`, `$defs`, `strict`, …) and on string formats other than
//! `enum` and `date-time`. So the conversion is an allowlist, applied recursively through
//! `properties`, `items` and `anyOf`:
//!
//! * kept: `type`, `format` (the supported ones), `title`, `description`, `nullable`, `enum`,
//!   `required`, `properties`, `items`, `anyOf`, `minItems`, `maxItems`, `minProperties`,
//!   `maxProperties`, `minLength`, `maxLength`, `pattern`, `minimum`, `maximum`, `example`,
//!   `default`, `propertyOrdering`;
//! * rewritten: `oneOf` → `anyOf`; `const: x` → `enum: [x]` (typed `string` if it is one); `type: ["string", "null"]` →
//!   `type: "string", nullable: true` (with several non-null types the first one wins);
//!   local `$ref`s (`#/$defs/…`, `#/definitions/…`) are inlined, a recursive reference being
//!   cut to `{"type": "object"}` where it recurses
//!   (and beyond bounded nesting and expansion budgets, against hostile schemas);
//! * dropped: every other key (`additionalProperties`, `$schema`, `$id`, `$defs`,
//!   `definitions`, `strict`, `examples`, `patternProperties`, …).

use serde_json::{Map, Value};

/// Keys copied as they are.
const KEPT: &[&str] = &[
    "title",
    "description",
    "nullable",
    "enum",
    "required",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "example",
    "default",
    "propertyOrdering",
];

/// The `format` values Gemini accepts (`enum`/`date-time` on strings, the numeric ones on
/// numbers); any other is dropped.
const FORMATS: &[&str] = &["enum", "date-time", "int32", "int64", "float", "double"];

/// How many `$ref`s deep inlining goes before a reference is cut.
const MAX_REF_DEPTH: usize = 8;
/// How many `$ref`s one schema may inline in all (bounds the work a hostile schema can cause).
const MAX_EXPANSIONS: usize = 256;
/// How deep a schema may nest; deeper nodes are cut.
const MAX_DEPTH: usize = 64;

/// The Gemini form of a JSON Schema (see the module documentation for what changes).
pub fn to_gemini_schema(schema: &Value) -> Value {
    let mut ctx = Ctx { root: schema, refs: Vec::new(), expansions: 0, depth: 0 };
    ctx.convert(schema)
}

/// The walk's state.
struct Ctx<'a> {
    root: &'a Value,
    /// The `$ref`s being inlined on the current path.
    refs: Vec<&'a str>,
    expansions: usize,
    depth: usize,
}

/// What a cut reference or an over-deep node becomes.
fn cut() -> Value {
    serde_json::json!({ "type": "object" })
}

impl<'a> Ctx<'a> {
    fn convert(&mut self, node: &'a Value) -> Value {
        if self.depth >= MAX_DEPTH {
            return cut();
        }
        self.depth += 1;
        let out = self.convert_node(node);
        self.depth -= 1;
        out
    }

    fn convert_node(&mut self, node: &'a Value) -> Value {
        let Value::Object(map) = node else {
            return node.clone();
        };
        if let Some(reference) = map.get("$ref").and_then(Value::as_str) {
            return self.inline_ref(map, reference);
        }
        let mut out = Map::new();
        for (key, value) in map {
            match key.as_str() {
                "type" => set_type(&mut out, value),
                "format" if value.as_str().is_some_and(|f| FORMATS.contains(&f)) => {
                    out.insert(key.clone(), value.clone());
                }
                "properties" => {
                    out.insert(key.clone(), self.convert_properties(value));
                }
                "items" => {
                    out.insert(key.clone(), self.convert(value));
                }
                "anyOf" | "oneOf" => {
                    out.insert("anyOf".to_owned(), self.convert_list(value));
                }
                "const" => {
                    out.entry("enum").or_insert_with(|| Value::Array(vec![value.clone()]));
                }
                k if KEPT.contains(&k) => {
                    out.insert(key.clone(), value.clone());
                }
                _ => {}
            }
        }
        // Gemini wants a type beside `enum` (a bare `const` has none).
        let string_enum = out.get("enum").and_then(Value::as_array).is_some_and(|v| v.iter().all(Value::is_string));
        if string_enum && !out.contains_key("type") {
            out.insert("type".to_owned(), Value::String("string".to_owned()));
        }
        Value::Object(out)
    }

    /// Inlines a local reference, keeping the referring node's `description` and `title`.
    fn inline_ref(&mut self, map: &'a Map<String, Value>, reference: &'a str) -> Value {
        let target = reference.strip_prefix('#').and_then(|pointer| self.root.pointer(pointer));
        let cyclic =
            self.refs.contains(&reference) || self.refs.len() >= MAX_REF_DEPTH || self.expansions >= MAX_EXPANSIONS;
        let mut out = match target {
            Some(target) if !cyclic => {
                self.expansions += 1;
                self.refs.push(reference);
                let converted = self.convert(target);
                self.refs.pop();
                converted
            }
            _ => cut(),
        };
        if let Value::Object(out) = &mut out {
            for key in ["description", "title"] {
                if let Some(value) = map.get(key) {
                    out.insert(key.to_owned(), value.clone());
                }
            }
        }
        out
    }

    /// `properties`: the names are kept as they are, each schema converted.
    fn convert_properties(&mut self, value: &'a Value) -> Value {
        match value {
            Value::Object(props) => {
                Value::Object(props.iter().map(|(name, schema)| (name.clone(), self.convert(schema))).collect())
            }
            other => other.clone(),
        }
    }

    fn convert_list(&mut self, value: &'a Value) -> Value {
        match value {
            Value::Array(items) => Value::Array(items.iter().map(|s| self.convert(s)).collect()),
            other => other.clone(),
        }
    }
}

/// `type`: a single type name, or the first non-null one of a list plus `nullable: true` if
/// the list has `"null"`.
fn set_type(out: &mut Map<String, Value>, value: &Value) {
    let Value::Array(types) = value else {
        out.insert("type".to_owned(), value.clone());
        return;
    };
    let names: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
    if let Some(first) = names.iter().find(|t| **t != "null") {
        out.insert("type".to_owned(), Value::String((*first).to_owned()));
        if names.contains(&"null") {
            out.insert("nullable".to_owned(), Value::Bool(true));
        }
    } else if !names.is_empty() {
        out.insert("type".to_owned(), Value::String("null".to_owned()));
    }
}

/// True when `schema` declares nothing: no schema, `{}`, or an object type without properties.
/// Gemini refuses `parameters` of type OBJECT with empty `properties`, so such parameters are
/// better left out.
pub(crate) fn is_empty_object(schema: &Value) -> bool {
    let Value::Object(map) = schema else {
        return false;
    };
    let is_object = map.get("type").and_then(Value::as_str).is_none_or(|t| t.eq_ignore_ascii_case("object"));
    let no_properties = map.get("properties").and_then(Value::as_object).is_none_or(Map::is_empty);
    is_object && no_properties && !map.contains_key("anyOf")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strips_unknown_keys_recursively() {
        let schema = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "additionalProperties": {"type": "string", "format": "email"},
                "tags": {"type": "array", "items": {"type": "string", "additionalProperties": false}},
                "when": {"type": ["string", "null"], "format": "date-time"}
            },
            "required": ["tags"]
        });
        assert_eq!(
            to_gemini_schema(&schema),
            json!({
                "type": "object",
                "properties": {
                    "additionalProperties": {"type": "string"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "when": {"type": "string", "nullable": true, "format": "date-time"}
                },
                "required": ["tags"]
            })
        );
    }

    #[test]
    fn inlines_refs_and_cuts_cycles() {
        let schema = json!({
            "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
            "type": "object",
            "properties": {"head": {"$ref": "#/$defs/Node", "description": "first"}}
        });
        let head = json!({
            "type": "object",
            "description": "first",
            "properties": {"next": {"type": "object"}}
        });
        assert_eq!(to_gemini_schema(&schema), json!({"type": "object", "properties": {"head": head}}));
    }

    #[test]
    fn empty_object_detection() {
        assert!(is_empty_object(&json!({})));
        assert!(is_empty_object(&json!({"type": "object", "properties": {}})));
        assert!(!is_empty_object(&json!({"type": "object", "properties": {"a": {"type": "string"}}})));
        assert!(!is_empty_object(&json!({"type": "string"})));
    }
}
