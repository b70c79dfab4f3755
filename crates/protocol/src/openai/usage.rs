//! Token usage (`usage`), read from every upstream answer and written with Marga's `cost`.
//!
//! Its objects are read by hand rather than with `#[serde(flatten)]`, which buffers a whole
//! object into serde's generic `Content` before reading a field of it: for the `usage` of
//! every answer and every stream's last chunk, that cost more than the rest of its reading.
//! Fields not named here are kept in `extra`, as everywhere in [`crate::openai`].

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::Extra;

/// Token usage, with Marga's `cost` added on the way out.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
    /// What the request cost the caller, in its organisation's currency (Marga writes it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<ExactNumber>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            ..Usage::default()
        }
    }

    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0)
    }

    pub fn reasoning_tokens(&self) -> u64 {
        self.completion_tokens_details.as_ref().and_then(|d| d.reasoning_tokens).unwrap_or(0)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CompletionTokensDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// A JSON number kept as written, every digit intact (money never passes through a float).
/// Marga writes it exactly; an upstream's value is read leniently (any JSON number or numeric
/// string) because it is only ever replaced.
#[derive(Clone, Debug, Serialize)]
#[serde(transparent)]
pub struct ExactNumber(Box<serde_json::value::RawValue>);

impl<'de> Deserialize<'de> for ExactNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = match Value::deserialize(deserializer)? {
            Value::Number(n) => n.to_string(),
            Value::String(s) if serde_json::from_str::<serde_json::Number>(&s).is_ok() => s,
            _ => "0".to_owned(),
        };
        ExactNumber::new(text).ok_or_else(|| de::Error::custom("not a number"))
    }
}

impl ExactNumber {
    /// `text` must be a JSON number (e.g. a decimal's `to_string()`).
    pub fn new(text: String) -> Option<ExactNumber> {
        serde_json::value::RawValue::from_string(text).ok().map(ExactNumber)
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for ExactNumber {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Reads an object's entries in order: `field` reads the value of a key the type names and
/// returns true; any other entry goes to the returned [`Extra`].
fn read_object<'de, A: MapAccess<'de>>(
    mut map: A,
    mut field: impl FnMut(&str, &mut A) -> Result<bool, A::Error>,
) -> Result<Extra, A::Error> {
    let mut extra = Extra::new();
    while let Some(Key(key)) = map.next_key()? {
        if !field(&key, &mut map)? {
            let value: Value = map.next_value()?;
            extra.insert(key.into_owned(), value);
        }
    }
    Ok(extra)
}

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UsageVisitor;
        impl<'de> Visitor<'de> for UsageVisitor {
            type Value = Usage;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a usage object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Usage, A::Error> {
                let mut usage = Usage::default();
                usage.extra = read_object(map, |key, map| {
                    match key {
                        "prompt_tokens" => usage.prompt_tokens = map.next_value()?,
                        "completion_tokens" => usage.completion_tokens = map.next_value()?,
                        "total_tokens" => usage.total_tokens = map.next_value()?,
                        "prompt_tokens_details" => usage.prompt_tokens_details = map.next_value()?,
                        "completion_tokens_details" => usage.completion_tokens_details = map.next_value()?,
                        "cost" => usage.cost = map.next_value()?,
                        _ => return Ok(false),
                    }
                    Ok(true)
                })?;
                Ok(usage)
            }
        }
        deserializer.deserialize_map(UsageVisitor)
    }
}

/// Reads a `*_tokens_details` object: the one count it names, and the rest.
struct DetailsVisitor<T> {
    field: &'static str,
    expecting: &'static str,
    build: fn(Option<u64>, Extra) -> T,
}

impl<'de, T> Visitor<'de> for DetailsVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        let mut count = None;
        let extra = read_object(map, |key, map| {
            let named = key == self.field;
            if named {
                count = map.next_value()?;
            }
            Ok(named)
        })?;
        Ok((self.build)(count, extra))
    }
}

impl<'de> Deserialize<'de> for PromptTokensDetails {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(DetailsVisitor {
            field: "cached_tokens",
            expecting: "a prompt_tokens_details object",
            build: |cached_tokens, extra| PromptTokensDetails { cached_tokens, extra },
        })
    }
}

impl<'de> Deserialize<'de> for CompletionTokensDetails {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(DetailsVisitor {
            field: "reasoning_tokens",
            expecting: "a completion_tokens_details object",
            build: |reasoning_tokens, extra| CompletionTokensDetails { reasoning_tokens, extra },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn named_fields_are_read_and_the_rest_kept() {
        let text = r#"{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,
            "prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},
            "completion_tokens_details":{"reasoning_tokens":2,"accepted_prediction_tokens":1},
            "cost":0.00012,"provider_note":{"a":[1,2]},"na\u006de":"escaped key"}"#;
        let usage: Usage = serde_json::from_str(text).unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (12, 5, 17));
        assert_eq!((usage.cached_tokens(), usage.reasoning_tokens()), (4, 2));
        assert_eq!(usage.cost.as_ref().map(ExactNumber::as_str), Some("0.00012"));
        assert_eq!(Value::Object(usage.extra.clone()), json!({"provider_note": {"a": [1, 2]}, "name": "escaped key"}));
        let details = usage.prompt_tokens_details.as_ref().unwrap();
        assert_eq!(Value::Object(details.extra.clone()), json!({"audio_tokens": 0}));
        // Written back, every field is there.
        let back: Value = serde_json::to_value(&usage).unwrap();
        assert_eq!(back["completion_tokens_details"], json!({"reasoning_tokens": 2, "accepted_prediction_tokens": 1}));
        assert_eq!(back["provider_note"], json!({"a": [1, 2]}));
        assert_eq!(serde_json::from_value::<Usage>(back).unwrap(), usage);
    }

    #[test]
    fn missing_fields_default_and_null_details_are_none() {
        let usage: Usage = serde_json::from_str(r#"{"prompt_tokens_details":null,"cost":"1.50"}"#).unwrap();
        assert_eq!(usage.prompt_tokens, 0);
        assert_eq!(usage.prompt_tokens_details, None);
        assert_eq!(usage.cost.as_ref().map(ExactNumber::as_str), Some("1.50"));
    }

    #[test]
    fn wrong_types_are_refused_as_before() {
        for text in [r#"{"prompt_tokens":"12"}"#, r#"{"prompt_tokens":null}"#, r#"{"prompt_tokens":-1}"#, r#"[1,2,3]"#, r#"{"prompt_tokens_details":3}"#] {
            assert!(serde_json::from_str::<Usage>(text).is_err(), "{text}");
        }
    }
}
