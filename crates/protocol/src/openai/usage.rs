//! Token usage (`usage`), read from every upstream answer and written with Marga's `cost`.
//! Fields not named here are kept in `extra`, as everywhere in [`crate::openai`].

use serde::{de, Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::Extra;

/// Token usage, with Marga's `cost` added on the way out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
    /// What the request cost the caller, in its organisation's currency (Marga writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionTokensDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
