//! Webhook secrets at rest: a batch's secret and the organisation's default are stored sealed
//! (their plaintext is nowhere in the data directory or the database), deliveries are still
//! signed with the plaintext (and the batch's request hash is keyed, not a plain hash of a body
//! holding the secret), and secrets stored in plaintext before sealing keep working.
//! The binary refuses to start on Postgres without a secrets key.

use serde_json::{json, Value};

use crate::accounts::{call, grant, new_key, new_org};
use crate::batch_webhook::{allowing, create, hmac_hex, items, receiver, wait_deliveries};
use crate::helpers::spawn_app_with;

#[tokio::test]
async fn webhook_secrets_are_stored_sealed_and_still_sign_deliveries() {
    let app = spawn_app_with(allowing()).await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "1").await;
    let (key, _) = new_key(&app, &management, json!({"name": "hooks"})).await;
    let (url, received) = receiver(0).await;
    let secret = "whsec-batch-plaintext-7c1e9a";
    let body = json!({"items": items(2), "webhook": {"url": url, "secret": secret}});
    let created = create(&app, &key, "sealed-hook-1", &body).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["batch"]["id"].as_str().unwrap().to_owned();
    let got = wait_deliveries(&received, 1).await;
    assert_eq!(got[0].0, hmac_hex(secret, &got[0].1), "signed with the plaintext secret");

    let (default_url, default_received) = receiver(0).await;
    let default_secret = "whsec-org-default-plaintext-4b2d";
    let put = call(&app, reqwest::Method::PUT, &management, "/v1/auth/account/delivery-webhook", Some(&json!({"url": default_url, "secret": default_secret}))).await;
    assert_eq!(put.status, 200, "{}", put.body);
    let second = create(&app, &key, "sealed-hook-2", &json!({"items": items(1)})).await;
    assert_eq!(second.status, 201, "{}", second.body);
    let got = wait_deliveries(&default_received, 1).await;
    assert_eq!(got[0].0, hmac_hex(default_secret, &got[0].1), "the default, signed with its plaintext");

    // What the store holds: sealed values, and no plaintext anywhere.
    let batch = app.store.get_batch(&org, &id).await.unwrap().unwrap();
    assert!(batch.webhook_secret.as_deref().is_some_and(|s| s.starts_with("v1:")), "{:?}", batch.webhook_secret);
    let plain = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.to_string().as_bytes()));
    assert!(batch.request_hash.as_deref().is_some_and(|h| h != plain), "the request hash is keyed, not a plain hash of the secret");
    let event: Value = serde_json::from_str(&got[0].1).unwrap();
    let delivery = app.store.get_delivery(event["id"].as_str().unwrap()).await.unwrap().unwrap();
    assert!(delivery.secret.starts_with("v1:"), "the queued delivery holds the sealed secret");
    let setting = app.store.get_setting(&format!("delivery_webhook:{org}")).await.unwrap().unwrap();
    let setting: Value = serde_json::from_str(&setting).unwrap();
    assert!(setting["secret"].as_str().unwrap().starts_with("v1:"), "{setting}");
    for plaintext in [secret, default_secret] {
        let found = app.stored_in_plaintext(plaintext).await;
        assert!(found.is_empty(), "{plaintext} stored in plaintext in {found:?}");
    }
    if app.database.is_none() {
        // SQLite without a configured key: one generated into the data directory, private.
        let key_file = app.data_dir.path().join("data").join("secrets.key");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", key_file.display());
    }
}

#[tokio::test]
async fn secrets_stored_in_plaintext_before_sealing_still_sign() {
    let app = spawn_app_with(allowing()).await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "1").await;
    let (key, _) = new_key(&app, &management, json!({"name": "hooks"})).await;
    let (url, received) = receiver(0).await;
    // The organisation's default as an older version stored it: plaintext.
    let legacy = json!({"url": url, "secret": "legacy-plaintext-secret"}).to_string();
    app.store.put_setting(&format!("delivery_webhook:{org}"), &legacy).await.unwrap();
    let created = create(&app, &key, "legacy-hook-1", &json!({"items": items(1)})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let got = wait_deliveries(&received, 1).await;
    assert_eq!(got[0].0, hmac_hex("legacy-plaintext-secret", &got[0].1));
}

#[test]
fn the_binary_refuses_postgres_without_a_secrets_key() {
    let dir = tempfile::tempdir().unwrap();
    // Refused while loading the config: the database is never reached.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_marga"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", "postgres://marga@127.0.0.1:1/marga", "--data-dir"])
        .arg(dir.path())
        .env_remove("MARGA_SECRETS_KEY")
        .env_remove("MARGA_CONFIG")
        .env_remove("MARGA_DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("invalid configuration") && stderr.contains("security.secrets_key") && stderr.contains("MARGA_SECRETS_KEY"), "{stderr}");
    assert!(!dir.path().join("secrets.key").exists(), "no key generated for Postgres");
}
