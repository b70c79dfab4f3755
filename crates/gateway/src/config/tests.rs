//! Tests of config loading: catalog gating by environment, merging, and error messages.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;

use super::*;

fn load(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(toml_text.as_bytes()).unwrap();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let overrides = Overrides { config_file: Some(file.path().to_owned()), ..Overrides::default() };
    Config::load_with_env(overrides, &lookup)
}

fn error_text(toml_text: &str) -> String {
    load(toml_text, &[]).expect_err("config should be refused").to_string()
}

#[test]
fn bundled_catalog_without_keys_enables_only_the_sandbox() {
    let config = load("", &[]).unwrap();
    assert_eq!(config.providers.keys().collect::<Vec<_>>(), vec!["sandbox"]);
    assert!(config.models.contains_key("sandbox/echo"));
    assert!(config.models.contains_key("sandbox/embed"));
    assert!(!config.models.contains_key("openai/gpt-4o-mini"));
    assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
}

#[test]
fn a_key_in_the_environment_enables_its_catalog_provider() {
    let config = load("", &[("OPENAI_API_KEY", "sk-test")]).unwrap();
    let openai = &config.providers["openai"];
    assert_eq!(openai.api_key.as_deref(), Some("sk-test"));
    assert!(config.models.contains_key("openai/gpt-4o-mini"));
}

#[test]
fn the_file_adds_providers_and_models_and_overrides_the_catalog() {
    let config = load(
        r#"
        listen = "127.0.0.1:9000"
        [providers.local]
        kind = "openai"
        base_url = "http://127.0.0.1:1234/v1"
        region = "IN"
        [providers.sandbox]
        region = "IN"
        [models."acme/small"]
        routes = [{ provider = "local", model = "small", input_per_mtok = "0.1", output_per_mtok = "0.2", currency = "INR" }]
        "#,
        &[],
    )
    .unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:9000");
    assert_eq!(config.providers["sandbox"].region, "IN");
    assert_eq!(config.providers["sandbox"].kind, marga_providers::ProviderKind::Sandbox);
    assert_eq!(config.models["acme/small"].routes[0].model, "small");
}

#[test]
fn errors_name_the_file_the_key_and_the_problem() {
    let unset = error_text("[providers.x]\nkind = \"openai\"\nbase_url = \"http://h\"\nregion = \"US\"\napi_key = \"${NOPE_KEY}\"\n");
    assert!(unset.contains("providers.x.api_key") && unset.contains("NOPE_KEY is not set"), "{unset}");

    let price = error_text("[models.\"m\"]\nroutes = [{ provider = \"sandbox\", model = \"echo\", input_per_mtok = \"cheap\", output_per_mtok = \"1\", currency = \"USD\" }]\n");
    assert!(price.contains("models.\"m\".routes[0].input_per_mtok") && price.contains("not a decimal"), "{price}");

    let currency = error_text("[models.\"m\"]\nroutes = [{ provider = \"sandbox\", model = \"echo\", input_per_mtok = \"1\", output_per_mtok = \"1\", currency = \"EUR\" }]\n");
    assert!(currency.contains("currency") && currency.contains("EUR"), "{currency}");

    let provider = error_text("[models.\"m\"]\nroutes = [{ provider = \"nope\", model = \"x\", input_per_mtok = \"1\", output_per_mtok = \"1\", currency = \"USD\" }]\n");
    assert!(provider.contains("unknown provider `nope`"), "{provider}");

    let region = error_text("[providers.x]\nkind = \"openai\"\nbase_url = \"http://h\"\nregion = \"india\"\n");
    assert!(region.contains("providers.x.region"), "{region}");

    let unknown = error_text("lisen = \"127.0.0.1:1\"\n");
    assert!(unknown.contains("lisen"), "{unknown}");

    let syntax = error_text("[providers\n");
    assert!(syntax.contains("line 1"), "{syntax}");

    let threads = error_text("[server]\nthreads = 100000\n");
    assert!(threads.contains("server.threads") && threads.contains("at most 1024"), "{threads}");
    assert_eq!(load("[server]\nthreads = 3\n", &[]).unwrap().server.serving_threads(), 3);
    assert!(load("", &[]).unwrap().server.serving_threads() >= 1);

    for interval in ["0", "10001"] {
        let message = error_text(&format!("[billing]\ncommit_interval_ms = {interval}\n"));
        assert!(message.contains("billing.commit_interval_ms") && message.contains("between 1 and 10000"), "{message}");
    }
    assert_eq!(load("", &[]).unwrap().billing.commit_interval_ms, 200);
    assert_eq!(load("[server]\n", &[]).unwrap().server.upstream_idle_connections, 256);
    let idle = error_text("[server]\nupstream_idle_connections = 65537\n");
    assert!(idle.contains("server.upstream_idle_connections") && idle.contains("at most 65536"), "{idle}");
    for ttl in ["0", "3601"] {
        let message = error_text(&format!("[billing]\nlease_ttl_s = {ttl}\n"));
        assert!(message.contains("billing.lease_ttl_s") && message.contains("between 1 and 3600"), "{message}");
    }
    assert_eq!(load("[billing]\nlease_ttl_s = 1\n", &[]).unwrap().billing.lease_ttl_s, 1);

    let kind = error_text("[providers.x]\nkind = \"cohere\"\nbase_url = \"http://h\"\nregion = \"US\"\n");
    assert!(kind.contains("providers.x") && kind.contains("cohere"), "{kind}");
}

#[test]
fn every_catalog_entry_is_valid_when_every_key_is_set() {
    let catalog: toml::Table = BUNDLED_CATALOG.parse().unwrap();
    let mut env = Vec::new();
    for provider in catalog["providers"].as_table().unwrap().values() {
        for value in provider.as_table().unwrap().values() {
            if let Some(s) = value.as_str() {
                for name in env::references(s) {
                    env.push((name.to_owned(), "http://127.0.0.1:1/v1".to_owned()));
                }
            }
        }
    }
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let config = load("", &env_refs).unwrap();
    assert_eq!(config.providers.len(), catalog["providers"].as_table().unwrap().len());
    assert_eq!(config.models.len(), catalog["models"].as_table().unwrap().len());
}

#[test]
fn batch_prices_come_in_pairs_and_only_where_the_provider_has_a_batch_api() {
    let provider = |kind: &str| format!("[providers.up]\nkind = \"{kind}\"\nbase_url = \"http://127.0.0.1:1/v1\"\nregion = \"US\"\n");
    let model = |prices: &str| {
        format!("[models.\"acme/m\"]\nroutes = [{{ provider = \"up\", model = \"m\", input_per_mtok = \"2\", output_per_mtok = \"8\", currency = \"USD\"{prices} }}]\n")
    };
    let both = r#", batch_input_per_mtok = "1", batch_output_per_mtok = "4""#;
    let config = load(&format!("{}{}", provider("openai"), model(both)), &[]).unwrap();
    let price = config.models["acme/m"].routes[0].batch_price().unwrap().unwrap();
    assert_eq!((price.input_per_mtok, price.output_per_mtok), (Decimal::ONE, Decimal::from(4)));
    let half = error_text(&format!("{}{}", provider("anthropic"), model(r#", batch_input_per_mtok = "1""#)));
    assert!(half.contains("batch_output_per_mtok") && half.contains("required"), "{half}");
    let gemini = error_text(&format!("{}{}", provider("gemini"), model(both)));
    assert!(gemini.contains("no native batch API"), "{gemini}");
    let bad = error_text(&format!("{}{}", provider("openai"), model(r#", batch_input_per_mtok = "x", batch_output_per_mtok = "4""#)));
    assert!(bad.contains("batch_input_per_mtok"), "{bad}");
}

#[test]
fn the_bundled_openai_and_anthropic_routes_have_batch_prices_at_half() {
    let config = load("", &[("OPENAI_API_KEY", "sk"), ("ANTHROPIC_API_KEY", "sk")]).unwrap();
    let route = |model: &str| config.models[model].routes.iter().find(|r| r.provider == "openai" || r.provider == "anthropic").unwrap().clone();
    for model in ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4.5"] {
        let route = route(model);
        let (price, batch) = (route.price().unwrap(), route.batch_price().unwrap().unwrap());
        assert_eq!(batch.input_per_mtok * Decimal::TWO, price.input_per_mtok, "{model}");
        assert_eq!(batch.output_per_mtok * Decimal::TWO, price.output_per_mtok, "{model}");
    }
}

#[test]
fn the_secrets_key_comes_from_the_environment_or_the_file_and_postgres_requires_one() {
    let hex_key = "2a".repeat(32);
    let base64_key = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";
    let from_env = load("", &[("MARGA_SECRETS_KEY", base64_key)]).unwrap();
    let from_file = load("[security]\nsecrets_key = \"${MY_KEY}\"\n", &[("MY_KEY", &hex_key)]).unwrap();
    assert!(from_env.secrets_key.is_some() && from_env.secrets_key == from_file.secrets_key, "hex and base64 alike");
    assert!(from_file.security.secrets_key.is_none(), "the raw value is not kept");
    assert!(load("", &[]).unwrap().secrets_key.is_none(), "SQLite: the key file is used");

    let bad = load("", &[("MARGA_SECRETS_KEY", "not-a-key-value")]).unwrap_err().to_string();
    assert!(bad.contains("MARGA_SECRETS_KEY") && bad.contains("security.secrets_key"), "{bad}");
    assert!(!bad.contains("not-a-key-value"), "the value is never quoted: {bad}");
    let unset = error_text("[security]\nsecrets_key = \"${MY_KEY}\"\n");
    assert!(unset.contains("MY_KEY"), "{unset}");

    let postgres = |env: &[(&str, &str)]| {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"").unwrap();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let database_url = Some("postgres://db.example/marga".to_owned());
        Config::load_with_env(Overrides { config_file: Some(file.path().to_owned()), database_url, ..Overrides::default() }, &lookup)
    };
    let refused = postgres(&[]).unwrap_err().to_string();
    assert!(refused.contains("security.secrets_key") && refused.contains("MARGA_SECRETS_KEY"), "{refused}");
    assert!(postgres(&[("MARGA_SECRETS_KEY", base64_key)]).unwrap().secrets_key.is_some());
}
