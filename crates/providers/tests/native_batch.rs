//! The native batch capability of the openai and anthropic kinds against the fake batch APIs
//! of `mock-upstream`: submit, poll until ended, fetch results as OpenAI chat completions;
//! refused items come back as item errors; the other kinds have no native batch API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use marga_protocol::openai::ChatCompletionRequest;
use marga_providers::{build, BatchRequest, BatchState, NativeBatch, Provider, ProviderKind, ProviderSettings};
use mock_upstream::{MockUpstream, Scenario};
use serde_json::json;

fn settings(kind: ProviderKind, base_url: String) -> ProviderSettings {
    ProviderSettings {
        kind,
        base_url,
        api_key: Some("sk-test".to_owned()),
        auth_header: None,
        headers: Vec::new(),
        supports_stream_usage: true,
        connect_timeout: Duration::from_secs(5),
        max_idle_connections: 16,
    }
}

fn requests() -> Vec<BatchRequest> {
    let request = |text: &str| -> ChatCompletionRequest {
        serde_json::from_value(json!({"model": "alias", "max_tokens": 16, "messages": [{"role": "user", "content": text}]})).unwrap()
    };
    vec![
        BatchRequest { custom_id: "item-0".to_owned(), request: request("first question") },
        BatchRequest { custom_id: "item-1".to_owned(), request: request("second question") },
    ]
}

async fn run(native: &dyn NativeBatch, mock: &MockUpstream) {
    mock.set_scenario(Scenario { batch_delay_ms: 300, reply: Some("batched answer".to_owned()), ..Scenario::default() });
    let id = native.submit(&requests(), "upstream-model").await.unwrap();
    assert_eq!(mock.batches_created(), 1);
    assert_eq!(native.status(&id).await.unwrap(), BatchState::Running);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(native.status(&id).await.unwrap(), BatchState::Ended);
    let mut results = native.results(&id).await.unwrap();
    results.sort_by(|a, b| a.custom_id.cmp(&b.custom_id));
    assert_eq!(results.iter().map(|r| r.custom_id.as_str()).collect::<Vec<_>>(), ["item-0", "item-1"]);
    for result in results {
        let answer = result.outcome.unwrap();
        assert_eq!(answer.choices[0].message.content.as_deref(), Some("batched answer"));
        let usage = answer.usage.unwrap();
        assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0, "{usage:?}");
    }
}

#[tokio::test]
async fn openai_kind_runs_a_batch_through_files_and_batches() {
    let mock = MockUpstream::start().await.unwrap();
    let provider = build(settings(ProviderKind::Openai, mock.openai_base())).unwrap();
    run(provider.native_batch().expect("openai has a batch API"), &mock).await;
    let upload = mock.requests_for("/v1/files");
    assert!(upload >= 1, "the input went up as a file");
}

#[tokio::test]
async fn anthropic_kind_runs_a_message_batch_and_translates_the_results() {
    let mock = MockUpstream::start().await.unwrap();
    let provider = build(settings(ProviderKind::Anthropic, mock.anthropic_base())).unwrap();
    run(provider.native_batch().expect("anthropic has a batch API"), &mock).await;
}

#[tokio::test]
async fn a_refused_item_is_an_item_error_and_a_refused_submission_an_error() {
    let mock = MockUpstream::start().await.unwrap();
    let provider = build(settings(ProviderKind::Openai, mock.openai_base())).unwrap();
    let native = provider.native_batch().unwrap();
    let mut items = requests();
    items[1].request.messages.clear();
    let id = native.submit(&items, "m").await.unwrap();
    assert_eq!(native.status(&id).await.unwrap(), BatchState::Ended);
    let results = native.results(&id).await.unwrap();
    let failed = results.iter().find(|r| r.custom_id == "item-1").unwrap();
    assert_eq!(failed.outcome.as_ref().unwrap_err().status, 400);
    mock.set_scenario(Scenario { fail_first: 1, fail_status: 500, ..Scenario::default() });
    assert!(native.submit(&requests(), "m").await.is_err());
}

#[tokio::test]
async fn gemini_and_sandbox_have_no_native_batch_api() {
    let gemini = build(settings(ProviderKind::Gemini, "http://127.0.0.1:9/v1beta".to_owned())).unwrap();
    assert!(gemini.native_batch().is_none());
    let sandbox: std::sync::Arc<dyn Provider> = build(settings(ProviderKind::Sandbox, String::new())).unwrap();
    assert!(sandbox.native_batch().is_none());
}

#[tokio::test]
async fn a_cancelled_batch_ends_without_answers() {
    for kind in [ProviderKind::Openai, ProviderKind::Anthropic] {
        let mock = MockUpstream::start().await.unwrap();
        mock.set_scenario(Scenario { batch_delay_ms: 60_000, ..Scenario::default() });
        let provider = build(settings(kind, mock.openai_base())).unwrap();
        let native = provider.native_batch().unwrap();
        let id = native.submit(&requests(), "m").await.unwrap();
        native.cancel(&id).await.unwrap();
        assert_eq!(mock.batches_cancelled(), 1);
        match native.status(&id).await.unwrap() {
            BatchState::Failed(reason) => assert!(reason.contains("cancelled"), "{kind:?}: {reason}"),
            BatchState::Ended => {
                let results = native.results(&id).await.unwrap();
                assert_eq!(results.len(), 2, "{kind:?}");
                assert!(results.iter().all(|r| r.outcome.as_ref().is_err_and(|e| e.message.contains("canceled"))), "{kind:?}");
            }
            BatchState::Running => panic!("{kind:?}: still running after cancel"),
        }
    }
}
