//! Marga's request extensions for routing (`optimize`, `provider`, `data_policy`,
//! `upstream_key`, `models`, `fallbacks`). They are parsed beside the OpenAI body and consumed
//! by the gateway: nothing in this module is ever serialised towards an upstream.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

/// A routing extension that does not have the documented shape.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for `{param}`: {message}")]
pub struct ExtensionError {
    /// The JSON path of the offending value, e.g. `provider.order`.
    pub param: String,
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct RoutingExtensions {
    /// BharatRouter strategy: `price`, `latency`, `uptime`, `throughput`, `auto`.
    #[serde(default)]
    pub optimize: Option<String>,
    /// A provider id to pin, or OpenRouter's provider-preferences object.
    #[serde(default)]
    pub provider: Option<ProviderPreference>,
    /// `india_only`, `zdr`, `no_training`, or a list of them.
    #[serde(default)]
    pub data_policy: Option<DataPolicy>,
    /// Per-request BYOK key for the upstream. Never stored, never logged.
    #[serde(default)]
    pub upstream_key: Option<String>,
    /// OpenRouter fallback models, in order.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// BharatRouter fallback chain.
    #[serde(default)]
    pub fallbacks: Option<Vec<FallbackStep>>,
    /// OpenRouter's deprecated `route` switch; accepted and ignored.
    #[serde(default)]
    pub route: Option<Value>,
}

impl RoutingExtensions {
    /// Removes Marga's keys from a parsed body's unknown fields and parses them, so that they
    /// are consumed here and can never travel upstream.
    pub fn take_from(extra: &mut Map<String, Value>) -> Result<RoutingExtensions, ExtensionError> {
        Ok(RoutingExtensions {
            optimize: take(extra, "optimize")?,
            provider: take(extra, "provider")?,
            data_policy: take(extra, "data_policy")?,
            upstream_key: take(extra, "upstream_key")?,
            models: take(extra, "models")?,
            fallbacks: take(extra, "fallbacks")?,
            route: take(extra, "route")?,
        })
    }
}

fn take<T: DeserializeOwned>(extra: &mut Map<String, Value>, key: &str) -> Result<Option<T>, ExtensionError> {
    match extra.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value)
            .map(Some)
            .map_err(|e| ExtensionError { param: key.to_owned(), message: e.to_string() }),
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ProviderPreference {
    Pin(String),
    Preferences(Box<ProviderPreferences>),
}

/// OpenRouter's `provider` object.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ProviderPreferences {
    #[serde(default)]
    pub order: Option<Vec<String>>,
    #[serde(default)]
    pub only: Option<Vec<String>>,
    #[serde(default)]
    pub ignore: Option<Vec<String>>,
    #[serde(default)]
    pub allow_fallbacks: Option<bool>,
    #[serde(default)]
    pub sort: Option<Value>,
    #[serde(default)]
    pub max_price: Option<Value>,
    #[serde(default)]
    pub data_collection: Option<String>,
    #[serde(default)]
    pub zdr: Option<bool>,
    #[serde(default)]
    pub require_parameters: Option<bool>,
    #[serde(default)]
    pub quantizations: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum DataPolicy {
    One(String),
    Many(Vec<String>),
}

impl DataPolicy {
    pub fn contains(&self, policy: &str) -> bool {
        match self {
            DataPolicy::One(p) => p == policy,
            DataPolicy::Many(ps) => ps.iter().any(|p| p == policy),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
pub struct FallbackStep {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn extensions_are_taken_out_of_the_body_and_parsed() {
        let mut extra: Map<String, Value> = serde_json::from_str(
            r#"{"optimize":"price","provider":{"order":["a"],"allow_fallbacks":false},"data_policy":"india_only",
                "upstream_key":"sk","models":["m2"],"fallbacks":[{"model":"m3","provider":"p"}],"logit_bias":{}}"#,
        )
        .unwrap();
        let ext = RoutingExtensions::take_from(&mut extra).unwrap();
        assert_eq!(extra.keys().collect::<Vec<_>>(), vec!["logit_bias"]);
        assert_eq!(ext.optimize.as_deref(), Some("price"));
        assert!(ext.data_policy.unwrap().contains("india_only"));
        assert_eq!(ext.fallbacks.unwrap()[0].provider.as_deref(), Some("p"));
        let Some(ProviderPreference::Preferences(p)) = ext.provider else { panic!("object form") };
        assert_eq!(p.allow_fallbacks, Some(false));

        let mut pinned: Map<String, Value> = serde_json::from_str(r#"{"provider":"sarvam"}"#).unwrap();
        let ext = RoutingExtensions::take_from(&mut pinned).unwrap();
        assert_eq!(ext.provider, Some(ProviderPreference::Pin("sarvam".into())));

        let mut bad: Map<String, Value> = serde_json::from_str(r#"{"models":"not-a-list"}"#).unwrap();
        assert_eq!(RoutingExtensions::take_from(&mut bad).unwrap_err().param, "models");
    }
}
