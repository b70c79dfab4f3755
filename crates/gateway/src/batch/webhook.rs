//! Delivery webhooks: when a batch ends (and, while it runs, at most every `[batch]
//! webhook_progress_ms` when items finished since the last one: `batch.progress`, sent once,
//! not retried), a JSON event is POSTed to the batch's webhook (or
//! the organisation's default, `PUT /v1/auth/account/delivery-webhook`), signed in
//! `X-BatchRouter-Signature` as the hex HMAC-SHA256 of the raw body with the webhook's secret.
//! A non-2xx answer (or no answer within 10 s) is retried with exponential backoff, up to
//! [`MAX_ATTEMPTS`] deliveries (spread over ~24 h by default: `[batch]
//! webhook_retry_base_ms`). Deliveries are rows in the store, claimed by the batch worker
//! like items, so retries survive a restart and are shared between instances. Secrets are
//! stored sealed (`crate::secrets`): the batch's, the organisation's default and the copy in
//! each queued delivery; the worker opens it only to sign.
//!
//! SSRF: a target must be `https` and every address its host resolves to must be public (not
//! private, loopback, link-local, CGNAT, unspecified or multicast), checked when the webhook
//! is set and again at each delivery, and the connection goes to the address that was checked
//! (no second DNS lookup, no redirects). `[security] allow_private_webhook_targets = true`
//! lifts the check (for local receivers, as the tests use).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hmac::{Hmac, Mac};
use marga_store::BatchRecord;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::pipeline::unix_now_ms;

/// Deliveries of one event at most.
pub const MAX_ATTEMPTS: u32 = 8;
/// Longest a receiver may take to answer.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Settings key of an organisation's default webhook.
pub fn org_setting(org_id: &str) -> String {
    format!("delivery_webhook:{org_id}")
}

/// Where and how to deliver. `secret` is the plaintext as a client gives it, sealed
/// (`crate::secrets`) once stored; `Debug` never shows it.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Target {
    pub url: String,
    pub secret: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("url", &self.url).field("secret", &"…").finish()
    }
}

/// Checks a webhook as given by a client: secret length and the URL's safety.
pub async fn check(target: &Target, allow_private: bool) -> Result<(), String> {
    if !(8..=256).contains(&target.secret.len()) {
        return Err("the webhook `secret` must be 8 to 256 characters".to_owned());
    }
    if target.url.len() > 2048 {
        return Err("the webhook `url` is too long".to_owned());
    }
    resolve(&target.url, allow_private).await.map(|_| ())
}

/// The URL's host and the address to connect to, once it passed the SSRF check.
async fn resolve(url: &str, allow_private: bool) -> Result<(String, SocketAddr), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("the webhook `url` is not a URL: {e}"))?;
    if parsed.scheme() != "https" && !(allow_private && parsed.scheme() == "http") {
        return Err("the webhook `url` must be https".to_owned());
    }
    let host = parsed.host_str().ok_or("the webhook `url` has no host")?.to_owned();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port)).await.map_err(|_| "the webhook host does not resolve".to_owned())?.collect(),
    };
    let first = *addrs.first().ok_or("the webhook host does not resolve")?;
    if !allow_private && addrs.iter().any(|a| !is_public(a.ip())) {
        return Err("the webhook `url` points to a private, loopback or link-local address".to_owned());
    }
    Ok((host, first))
}

/// A globally routable unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// The hex HMAC-SHA256 of `body` with `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// An event of a batch: `batch.<kind>` (`completed`, `cancelled`, `expired`, `progress`).
pub fn event(batch: &BatchRecord, kind: &str, status: &str, output: Option<&str>, errors: Option<&str>) -> Value {
    json!({
        "id": format!("evt_{}", uuid::Uuid::now_v7().simple()),
        "type": format!("batch.{kind}"),
        "created": unix_now_ms() / 1000,
        "data": {
            "batch_id": batch.id,
            "status": status,
            "items_total": batch.total,
            "items_completed": batch.completed,
            "items_failed": batch.failed,
            "output_file_id": output,
            "error_file_id": errors,
        },
    })
}

/// When the retry after `attempts` failed deliveries is due: `retry_base` doubled for each
/// failure after the first.
pub fn retry_delay(retry_base: Duration, attempts: u32) -> Duration {
    retry_base.saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
}

/// One delivery of a signed body; `Err` says why it failed.
pub async fn post(url: &str, body: &str, signed: &str, allow_private: bool) -> Result<(), String> {
    post_once(url, body, signed, allow_private).await
}

async fn post_once(url: &str, body: &str, signed: &str, allow_private: bool) -> Result<(), String> {
    let (host, addr) = resolve(url, allow_private).await?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(DELIVERY_TIMEOUT)
        .resolve(&host, addr)
        .build()
        .map_err(|_| "could not build the webhook client".to_owned())?;
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-batchrouter-signature", signed)
        .body(body.to_owned())
        .send()
        .await
        .map_err(|e| format!("transport: {}", e.without_url()))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("status {}", response.status().as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for private in ["10.1.2.3", "172.16.0.1", "192.168.1.1", "127.0.0.1", "169.254.169.254", "0.0.0.0", "100.64.0.1", "::1", "fe80::1", "fd00::1", "::ffff:10.0.0.1"] {
            assert!(!is_public(ip(private)), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(ip(public)), "{public}");
        }
    }

    #[tokio::test]
    async fn only_https_to_public_hosts_passes() {
        let target = |url: &str| Target { url: url.to_owned(), secret: "long-enough".to_owned() };
        for refused in ["http://8.8.8.8/hook", "https://127.0.0.1/hook", "https://[::1]/hook", "https://169.254.169.254/latest", "https://localhost/x", "ftp://x"] {
            assert!(check(&target(refused), false).await.is_err(), "{refused}");
        }
        assert!(check(&target("https://8.8.8.8/hook"), false).await.is_ok());
        assert!(check(&target("http://127.0.0.1:9/hook"), true).await.is_ok(), "allowed by the operator");
        assert!(check(&Target { url: "https://8.8.8.8/".to_owned(), secret: "short".to_owned() }, false).await.is_err());
    }

    #[test]
    fn retries_double_from_the_base() {
        let base = Duration::from_secs(675);
        let delays: Vec<u64> = (1..8).map(|a| retry_delay(base, a).as_secs()).collect();
        assert_eq!(delays, [675, 1350, 2700, 5400, 10800, 21600, 43200]);
        assert!(delays.iter().sum::<u64>() < 24 * 3600, "8 deliveries within a day");
    }

    #[test]
    fn the_signature_is_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
