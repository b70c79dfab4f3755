//! `[log]` and `[telemetry]`: the request log's writer, the log format, and the OpenTelemetry
//! export, as written in the file and resolved (with the environment) into [`LogConfig`] and
//! [`TelemetryConfig`].

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError};

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    format: Option<LogFormat>,
    /// Longest a finished request's record waits in memory before it is written (ms).
    /// Falls back to `[server] log_flush_ms`.
    flush_interval_ms: Option<u64>,
    /// How many records may wait in memory. Falls back to `[server] log_queue`.
    queue: Option<usize>,
    /// Largest spill file in MiB (0: no spill file).
    spill_max_mb: Option<u64>,
}

/// `[telemetry]`, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTelemetry {
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
}

/// The request log and log output, resolved.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    /// Longest a record waits in memory before the writer writes it.
    pub flush_interval: Duration,
    /// Capacity of the in-memory queue between requests and the writer.
    pub queue: usize,
    /// Largest size of the spill file (`requests.spill` in the data directory) that holds
    /// records while the database cannot take them; 0 disables it.
    pub spill_max_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            flush_interval: Duration::from_millis(200),
            queue: 65_536,
            spill_max_bytes: DEFAULT_SPILL_MB * 1024 * 1024,
        }
    }
}

/// OpenTelemetry export, resolved.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint (`http://collector:4318`); `None`: no traces are exported.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported resource.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { otlp_endpoint: None, service_name: "marga".to_owned() }
    }
}

const DEFAULT_SPILL_MB: u64 = 1024;
const MAX_FLUSH_MS: u64 = 60_000;
const MAX_QUEUE: usize = 10_000_000;

impl RawLog {
    /// `server` gives the older `[server] log_flush_ms` / `log_queue`; `MARGA_LOG_FORMAT`
    /// (`text` or `json`) wins over the file.
    pub fn resolve(
        &self,
        server: &super::schema::ServerSettings,
        file: &str,
        lookup: &impl Fn(&str) -> Option<String>,
    ) -> Result<LogConfig, ConfigError> {
        let format = match lookup("MARGA_LOG_FORMAT").filter(|v| !v.is_empty()) {
            Some(v) if v.eq_ignore_ascii_case("json") => LogFormat::Json,
            Some(v) if v.eq_ignore_ascii_case("text") => LogFormat::Text,
            Some(_) => return Err(invalid("MARGA_LOG_FORMAT", "log.format", "must be `text` or `json`")),
            None => self.format.unwrap_or_default(),
        };
        let flush_ms = self.flush_interval_ms.unwrap_or(server.log_flush_ms);
        if !(1..=MAX_FLUSH_MS).contains(&flush_ms) {
            return Err(invalid(file, "log.flush_interval_ms", format!("must be between 1 and {MAX_FLUSH_MS}")));
        }
        let queue = self.queue.unwrap_or(server.log_queue);
        if !(1..=MAX_QUEUE).contains(&queue) {
            return Err(invalid(file, "log.queue", format!("must be between 1 and {MAX_QUEUE}")));
        }
        let spill_mb = self.spill_max_mb.unwrap_or(DEFAULT_SPILL_MB);
        if spill_mb > 1024 * 1024 {
            return Err(invalid(file, "log.spill_max_mb", "must be at most 1048576 (1 TiB)"));
        }
        Ok(LogConfig {
            format,
            flush_interval: Duration::from_millis(flush_ms),
            queue,
            spill_max_bytes: spill_mb * 1024 * 1024,
        })
    }
}

impl RawTelemetry {
    /// `MARGA_OTLP_ENDPOINT` wins over `otlp_endpoint` (an empty value turns export off).
    pub fn resolve(&self, file: &str, lookup: &impl Fn(&str) -> Option<String>) -> Result<TelemetryConfig, ConfigError> {
        let (endpoint, source) = match lookup("MARGA_OTLP_ENDPOINT") {
            Some(v) => (Some(v), "MARGA_OTLP_ENDPOINT"),
            None => (self.otlp_endpoint.clone(), file),
        };
        let endpoint = endpoint.map(|e| e.trim().to_owned()).filter(|e| !e.is_empty());
        if let Some(url) = &endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 {
                return Err(invalid(source, "telemetry.otlp_endpoint", "must be an http:// or https:// URL"));
            }
        }
        let service_name = self.service_name.clone().unwrap_or_else(|| "marga".to_owned());
        if service_name.is_empty() || service_name.len() > 128 {
            return Err(invalid(file, "telemetry.service_name", "must be 1 to 128 characters"));
        }
        Ok(TelemetryConfig { otlp_endpoint: endpoint, service_name })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::schema::ServerSettings;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn log_falls_back_to_the_server_keys_and_the_environment_wins_on_format() {
        let server = ServerSettings { log_flush_ms: 20, log_queue: 10, ..ServerSettings::default() };
        let resolved = RawLog::default().resolve(&server, "f", &no_env).unwrap();
        assert_eq!((resolved.flush_interval, resolved.queue), (Duration::from_millis(20), 10));
        assert_eq!(resolved.format, LogFormat::Text);
        let raw = RawLog { flush_interval_ms: Some(500), format: Some(LogFormat::Text), ..RawLog::default() };
        let json = |n: &str| (n == "MARGA_LOG_FORMAT").then(|| "JSON".to_owned());
        let resolved = raw.resolve(&server, "f", &json).unwrap();
        assert_eq!((resolved.flush_interval, resolved.format), (Duration::from_millis(500), LogFormat::Json));
        let zero = RawLog { flush_interval_ms: Some(0), ..RawLog::default() };
        assert!(zero.resolve(&server, "f", &no_env).unwrap_err().to_string().contains("log.flush_interval_ms"));
        let bad = |n: &str| (n == "MARGA_LOG_FORMAT").then(|| "yaml".to_owned());
        assert!(RawLog::default().resolve(&server, "f", &bad).is_err());
    }

    #[test]
    fn otlp_endpoint_comes_from_the_file_or_the_environment_and_must_be_http() {
        let raw = RawTelemetry { otlp_endpoint: Some("http://file:4318".into()), service_name: None };
        assert_eq!(raw.resolve("f", &no_env).unwrap().otlp_endpoint.as_deref(), Some("http://file:4318"));
        let env = |n: &str| (n == "MARGA_OTLP_ENDPOINT").then(|| "https://env:4318".to_owned());
        assert_eq!(raw.resolve("f", &env).unwrap().otlp_endpoint.as_deref(), Some("https://env:4318"));
        let off = |n: &str| (n == "MARGA_OTLP_ENDPOINT").then(String::new);
        assert_eq!(raw.resolve("f", &off).unwrap().otlp_endpoint, None);
        let bad = RawTelemetry { otlp_endpoint: Some("collector:4317".into()), service_name: None };
        assert!(bad.resolve("f", &no_env).unwrap_err().to_string().contains("telemetry.otlp_endpoint"));
        assert_eq!(RawTelemetry::default().resolve("f", &no_env).unwrap().service_name, "marga");
    }
}
