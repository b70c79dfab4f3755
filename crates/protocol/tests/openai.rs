//! OpenAI wire types: unknown parameters survive the trip upstream, Marga's extensions do not,
//! relayed answers and chunks say what the typed ones say, and no input — however malformed —
//! makes parsing panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use marga_protocol::openai::{
    ChatCompletionChunk, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, EmbeddingResponse, Outbound,
    StreamOptions,
};
use marga_protocol::answer::ChatAnswer;
use marga_protocol::relayed::{ChatChunk, Identity};
use marga_protocol::routing::RoutingExtensions;
use proptest::prelude::*;
use serde_json::{json, Value};

fn outbound_json(request: &ChatCompletionRequest, model: &str, stream: bool, options: Option<&StreamOptions>) -> Value {
    serde_json::to_value(Outbound { model, stream, stream_options: options, body: request }).unwrap()
}

#[test]
fn unknown_parameters_pass_through_and_the_model_is_rewritten() {
    let body = json!({
        "model": "openai/gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi", "name": "ann", "vendor_field": 1}],
        "logit_bias": {"50256": -100},
        "custom_vendor_flag": true,
        "temperature": 0.2,
        "stream": true,
        "stream_options": {"include_usage": false, "continuous_usage_stats": true},
    });
    let request: ChatCompletionRequest = serde_json::from_value(body).unwrap();
    let options = StreamOptions { include_usage: Some(true), ..request.stream_options.clone().unwrap() };
    let out = outbound_json(&request, "gpt-4o-mini", true, Some(&options));
    assert_eq!(out["model"], "gpt-4o-mini");
    assert_eq!(out["logit_bias"], json!({"50256": -100}));
    assert_eq!(out["custom_vendor_flag"], true);
    assert_eq!(out["temperature"], 0.2);
    assert_eq!(out["stream"], true);
    assert_eq!(out["stream_options"], json!({"include_usage": true, "continuous_usage_stats": true}));
    assert_eq!(out["messages"][0], json!({"role": "user", "content": "hi", "name": "ann", "vendor_field": 1}));
}

#[test]
fn routing_extensions_never_reach_the_outbound_body() {
    let body = json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "optimize": "price", "provider": {"order": ["a"]}, "data_policy": "india_only",
        "upstream_key": "sk-secret", "models": ["b"], "fallbacks": [{"model": "c"}], "route": "fallback",
    });
    let mut request: ChatCompletionRequest = serde_json::from_value(body).unwrap();
    RoutingExtensions::take_from(&mut request.extra).unwrap();
    let out = outbound_json(&request, "m", false, None);
    let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
    assert_eq!(keys, vec!["messages", "model"]);
}

#[test]
fn chunks_and_other_requests_parse() {
    let chunk: ChatCompletionChunk = serde_json::from_value(json!({
        "id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]
    }))
    .unwrap();
    assert!(!chunk.has_content(), "a role prelude is not content");
    let embed: EmbeddingRequest = serde_json::from_value(json!({"model": "e", "input": ["a", "b"]})).unwrap();
    assert_eq!(embed.input.texts(), vec!["a", "b"]);
    let legacy: CompletionRequest = serde_json::from_value(json!({"model": "c", "prompt": "Say hi", "echo": true})).unwrap();
    let chat = marga_protocol::legacy::completion_to_chat(&legacy);
    assert_eq!(chat.messages[0].text_content(), "Say hi");
}

/// Arbitrary JSON, nested a few levels, biased towards the keys a chat request has.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "[a-z \\u{1F600}\\u{0}\"]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let key = prop_oneof![
            Just("model".to_owned()),
            Just("messages".to_owned()),
            Just("role".to_owned()),
            Just("content".to_owned()),
            Just("type".to_owned()),
            Just("text".to_owned()),
            Just("tools".to_owned()),
            Just("tool_calls".to_owned()),
            Just("stream".to_owned()),
            Just("provider".to_owned()),
            Just("fallbacks".to_owned()),
            Just("stop".to_owned()),
            "[a-z_]{1,8}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid chat request with up to six parameters Marga does not know, of any JSON value.
fn arb_request() -> impl Strategy<Value = Value> {
    let role = prop_oneof![Just("user"), Just("assistant"), Just("system"), Just("developer")];
    let message = (role, "[a-zA-Z0-9 ]{0,40}").prop_map(|(r, c)| json!({"role": r, "content": c}));
    let unknown_key = "x_[a-z_]{1,10}";
    (prop::collection::vec(message, 1..4), prop::collection::btree_map(unknown_key, arb_json(), 0..6)).prop_map(
        |(messages, extra)| {
            let mut body = serde_json::Map::new();
            body.insert("model".into(), json!("public/model"));
            body.insert("messages".into(), Value::Array(messages));
            body.extend(extra);
            Value::Object(body)
        },
    )
}

#[test]
fn embedding_vectors_are_relayed_as_written() {
    // Digits a float would lose, an exponent, a base64 string: all come back byte for byte.
    let upstream = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.10000000000000000555,-1E-7,3]},{"object":"embedding","index":1,"embedding":"AACAPwAAAMA="}],"model":"m"}"#;
    let response: EmbeddingResponse = serde_json::from_str(upstream).unwrap();
    assert_eq!(serde_json::to_string(&response).unwrap(), upstream);
    assert_eq!(response.data[0].embedding.to_floats(), Some(vec![0.1, -1e-7, 3.0]));
    assert_eq!(response.data[0].embedding.to_base64(), None);
    assert_eq!(response.data[1].embedding.to_base64().as_deref(), Some("AACAPwAAAMA="));
    assert_eq!(response.data[1].embedding.to_floats(), None);
}

/// Up to three fields Marga does not know, of any JSON value.
fn arb_unknown() -> impl Strategy<Value = serde_json::Map<String, Value>> {
    prop::collection::btree_map("x_[a-z_]{1,10}", arb_json(), 0..3).prop_map(|m| m.into_iter().collect())
}

fn with_unknown(mut value: Value, unknown: serde_json::Map<String, Value>) -> Value {
    value.as_object_mut().unwrap().extend(unknown);
    value
}

/// A valid upstream chat answer with usage, unknown fields at every level.
fn arb_answer() -> impl Strategy<Value = Value> {
    let content = prop_oneof![Just(Value::Null), "[a-z \\n\"\u{e9}\u{1F600}]{0,20}".prop_map(Value::String)];
    let message = (content, arb_unknown()).prop_map(|(c, u)| with_unknown(json!({"role": "assistant", "content": c}), u));
    let finish = prop_oneof![Just(Value::Null), Just(json!("stop")), Just(json!("length")), Just(json!("vendor_reason"))];
    let choice = (message, finish, arb_unknown())
        .prop_map(|(m, f, u)| with_unknown(json!({"index": 0, "message": m, "logprobs": null, "finish_reason": f}), u));
    let usage = (0u32..5000, 0u32..5000, arb_unknown())
        .prop_map(|(p, c, u)| with_unknown(json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}), u));
    (prop::collection::vec(choice, 0..3), usage, arb_unknown()).prop_map(|(choices, usage, u)| {
        let answer = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "up",
                            "choices": choices, "usage": usage});
        with_unknown(answer, u)
    })
}

/// What the gateway does to an answer before writing it out.
fn as_the_gateway_writes(mut answer: ChatAnswer) -> Value {
    answer.set_identity("gen-1", "team/model");
    if let Some(usage) = answer.usage_mut() {
        usage.completion_tokens += 1;
    }
    serde_json::from_slice(&answer.to_json().unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn upstream_answers_and_chunks_of_any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(mut answer) = ChatAnswer::from_upstream_json(bytes.clone()) {
            answer.set_identity("gen-1", "m");
            let _ = answer.to_json();
        }
        if let Ok(chunk) = ChatChunk::from_upstream_json(String::from_utf8_lossy(&bytes).into_owned()) {
            let _ = chunk.write_json(&Identity::new("gen-1", "m"), &mut Vec::new());
        }
    }

    #[test]
    fn a_relayed_answer_says_and_writes_what_the_typed_answer_does(answer in arb_answer()) {
        let relayed = ChatAnswer::from_upstream_json(answer.to_string().into_bytes()).unwrap();
        prop_assert!(matches!(relayed, ChatAnswer::Relayed(_)), "a plain answer with usage is relayed");
        let parsed = ChatAnswer::Parsed(serde_json::from_value(answer).unwrap());
        prop_assert_eq!(relayed.finish_reason(), parsed.finish_reason());
        prop_assert_eq!(relayed.text(), parsed.text());
        prop_assert_eq!(as_the_gateway_writes(relayed), as_the_gateway_writes(parsed));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = serde_json::from_slice::<ChatCompletionRequest>(&bytes);
        let _ = serde_json::from_slice::<ChatCompletionChunk>(&bytes);
        let _ = serde_json::from_slice::<EmbeddingRequest>(&bytes);
    }

    #[test]
    fn unknown_parameters_all_reach_the_upstream_body(request in arb_request()) {
        // Every generated request is valid, so the property is checked on each case. It is
        // read from its text, as the gateway reads it: every float must come out as it went in.
        let mut parsed = serde_json::from_str::<ChatCompletionRequest>(&request.to_string());
        prop_assert!(parsed.is_ok(), "a valid request was refused: {:?}", parsed.as_ref().err());
        let parsed = parsed.as_mut().unwrap();
        RoutingExtensions::take_from(&mut parsed.extra).unwrap();
        let out = outbound_json(parsed, "upstream", false, None);
        let out = out.as_object().unwrap();
        prop_assert_eq!(&out["model"], "upstream");
        prop_assert_eq!(&out["messages"], &request["messages"]);
        for (key, v) in request.as_object().unwrap() {
            if key != "model" && key != "messages" && !v.is_null() {
                prop_assert_eq!(out.get(key), Some(v), "`{}` did not arrive as sent", key);
            }
        }
    }
}
