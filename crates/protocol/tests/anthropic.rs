//! Anthropic conversions: data-driven snapshot tests over `tests/fixtures/anthropic/{request,
//! response,stream}` (one `check_*` helper per folder; add a file, run with
//! `INSTA_UPDATE=always`, review the new `.snap`), targeted unit tests, and property tests that
//! arbitrary input never panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use marga_protocol::anthropic::{
    from_messages_response, to_messages_request, MessagesResponse, StreamStep, StreamTranslator,
};
use marga_protocol::openai::{ChatCompletionRequest, ChatMessage, Role};
use marga_protocol::ConvertError;
use proptest::prelude::*;
use serde_json::{json, Value};

const UPSTREAM_MODEL: &str = "claude-sonnet-4-5";
const DEFAULT_MAX_TOKENS: u32 = 4096;
const CREATED: u64 = 1_700_000_000;

// === Data-driven snapshots ===

/// Every fixture of `kind` with extension `ext`, sorted by name.
fn fixtures(kind: &str, ext: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/anthropic").join(kind);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixtures in {}", dir.display());
    paths
}

/// Snapshots `render(fixture text)` for every fixture of the folder as `<kind>__<stem>`.
fn check_dir(kind: &str, ext: &str, render: impl Fn(&str) -> Value) {
    for path in fixtures(kind, ext) {
        let text = std::fs::read_to_string(&path).unwrap();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let mut settings = insta::Settings::clone_current();
        settings.set_input_file(&path);
        settings.set_omit_expression(true);
        settings.bind(|| insta::assert_json_snapshot!(format!("{kind}__{stem}"), render(&text)));
    }
}

/// OpenAI chat request → the Anthropic request (or the conversion error).
fn check_request(text: &str) -> Value {
    let request: ChatCompletionRequest = serde_json::from_str(text).unwrap();
    match to_messages_request(&request, UPSTREAM_MODEL, DEFAULT_MAX_TOKENS) {
        Ok(converted) => serde_json::to_value(converted).unwrap(),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// Anthropic response → the OpenAI response.
fn check_response(text: &str) -> Value {
    let response: MessagesResponse = serde_json::from_str(text).unwrap();
    serde_json::to_value(from_messages_response(response, CREATED)).unwrap()
}

/// Anthropic SSE transcript → every event with what the translator made of it.
fn check_stream(text: &str) -> Value {
    let mut translator = StreamTranslator::new(CREATED);
    let steps: Vec<Value> = parse_sse(text)
        .into_iter()
        .map(|(event, data)| {
            let out = step_json(translator.push(&event, &data));
            json!({ "event": event, "out": out })
        })
        .collect();
    Value::Array(steps)
}

fn step_json(step: StreamStep) -> Value {
    match step {
        StreamStep::Chunks(chunks) => serde_json::to_value(chunks).unwrap(),
        StreamStep::Done => json!("[DONE]"),
        StreamStep::Error { message, kind } => json!({ "error": { "message": message, "kind": kind } }),
    }
}

/// `(event, data)` pairs of an SSE text (`event: x\ndata: y\n\n`).
fn parse_sse(text: &str) -> Vec<(String, String)> {
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let (mut event, mut data) = (String::new(), Vec::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim_start().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        events.push((event, data.join("\n")));
    }
    events
}

#[test]
fn request_fixtures() {
    check_dir("request", "json", check_request);
}

#[test]
fn response_fixtures() {
    check_dir("response", "json", check_response);
}

#[test]
fn stream_fixtures() {
    check_dir("stream", "sse", check_stream);
}

// === Targeted checks ===

fn request(body: Value) -> ChatCompletionRequest {
    serde_json::from_value(body).unwrap()
}

fn user_says(text: &str) -> ChatCompletionRequest {
    ChatCompletionRequest { messages: vec![ChatMessage::text(Role::User, text)], ..Default::default() }
}

#[test]
fn max_tokens_falls_back_to_the_default() {
    let converted = to_messages_request(&user_says("hi"), "m", 777).unwrap();
    assert_eq!(converted.max_tokens, 777);
    assert_eq!(converted.model, "m");
}

#[test]
fn invalid_tool_arguments_name_the_message() {
    let body = json!({"model": "x", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
        ]}
    ]});
    let err = to_messages_request(&request(body), "m", 10).unwrap_err();
    let ConvertError::InvalidParam { param, .. } = err else { panic!("{err:?}") };
    assert!(param.starts_with("messages[1].tool_calls"), "{param}");
}

#[test]
fn n_above_one_is_unsupported() {
    let mut req = user_says("hi");
    req.n = Some(3);
    let err = to_messages_request(&req, "m", 10).unwrap_err();
    assert!(matches!(err, ConvertError::Unsupported { .. }), "{err:?}");
}

#[test]
fn openai_only_extras_are_not_sent() {
    let mut req = user_says("hi");
    req.extra.insert("logit_bias".to_owned(), json!({"1": 2}));
    req.seed = Some(1);
    let body = serde_json::to_value(to_messages_request(&req, "m", 10).unwrap()).unwrap();
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["max_tokens", "messages", "model"]);
}

fn transcript(translator: &mut StreamTranslator, events: &[(&str, Value)]) -> Vec<StreamStep> {
    events.iter().map(|(event, data)| translator.push(event, &data.to_string())).collect()
}

fn chunks(step: &StreamStep) -> &[marga_protocol::openai::ChatCompletionChunk] {
    match step {
        StreamStep::Chunks(c) => c,
        other => panic!("expected chunks, got {other:?}"),
    }
}

#[test]
fn stream_ends_with_usage_then_done() {
    let mut t = StreamTranslator::new(5);
    let message = json!({"id": "msg_1", "model": "c", "usage": {"input_tokens": 3, "output_tokens": 1}});
    let steps = transcript(
        &mut t,
        &[
            ("message_start", json!({"type": "message_start", "message": message})),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ],
    );
    assert!(t.is_done());
    let last = &chunks(&steps[2])[0];
    assert!(last.choices.is_empty());
    let usage = last.usage.as_ref().unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), (3, 9, 12));
    assert_eq!((last.id.as_str(), last.model.as_str(), last.created), ("msg_1", "c", 5));
    assert_eq!(t.push("ping", "{}"), StreamStep::Done);
}

#[test]
fn tool_call_index_is_its_ordinal_not_the_block_index() {
    let mut t = StreamTranslator::new(0);
    let start = |index: u32, id: &str| {
        let block = json!({"type": "tool_use", "id": id, "name": "f", "input": {}});
        json!({"type": "content_block_start", "index": index, "content_block": block})
    };
    let steps = transcript(&mut t, &[("content_block_start", start(3, "a")), ("content_block_start", start(7, "b"))]);
    let indexes: Vec<u32> =
        steps.iter().map(|s| chunks(s)[0].choices[0].delta.tool_calls.as_ref().unwrap()[0].index).collect();
    assert_eq!(indexes, [0, 1]);
}

#[test]
fn pings_unknown_events_and_unnamed_events() {
    let mut t = StreamTranslator::new(0);
    assert_eq!(t.push("ping", "not even json"), StreamStep::Chunks(vec![]));
    assert_eq!(t.push("future_thing", "{oops"), StreamStep::Chunks(vec![]));
    assert_eq!(t.push("message", r#"{"type":"future_thing"}"#), StreamStep::Chunks(vec![]));
    let delta = r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}"#;
    assert_eq!(chunks(&t.push("", delta)).len(), 1);
    let StreamStep::Error { kind, .. } = t.push("content_block_delta", "{oops") else { panic!() };
    assert_eq!(kind, "malformed");
    let StreamStep::Error { message, kind } =
        t.push("error", r#"{"type":"error","error":{"type":"api_error","message":"boom"}}"#)
    else {
        panic!()
    };
    assert_eq!((message.as_str(), kind.as_str()), ("boom", "api_error"));
}

// === Properties ===

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const EVENTS: [&str; 10] = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
    "message",
    "",
];

fn arb_event_name() -> impl Strategy<Value = String> {
    prop_oneof![4 => prop::sample::select(&EVENTS[..]).prop_map(str::to_owned), 1 => "[a-z_]{0,10}"]
}

/// Event data: garbage, arbitrary JSON, or near-valid events with arbitrary values.
fn arb_event_data() -> impl Strategy<Value = String> {
    const WORDS: [&str; 8] =
        ["text", "tool_use", "thinking", "text_delta", "input_json_delta", "thinking_delta", "end_turn", "x"];
    let word = || prop::sample::select(&WORDS[..]);
    prop_oneof![
        ".{0,30}",
        arb_json().prop_map(|v| v.to_string()),
        (any::<u64>(), any::<u64>(), prop::option::of(any::<u64>())).prop_map(|(i, o, c)| {
            let usage = json!({"input_tokens": i, "output_tokens": o, "cache_read_input_tokens": c});
            json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": usage}}).to_string()
        }),
        (any::<u32>(), word(), ".{0,8}").prop_map(|(i, t, s)| {
            let block = json!({"type": t, "text": s, "thinking": s, "id": s, "name": s, "input": {}});
            json!({"type": "content_block_start", "index": i % 4, "content_block": block}).to_string()
        }),
        (any::<u32>(), word(), ".{0,8}").prop_map(|(i, t, s)| {
            let delta = json!({"type": t, "text": s, "partial_json": s, "thinking": s});
            json!({"type": "content_block_delta", "index": i % 4, "delta": delta}).to_string()
        }),
        (word(), any::<u64>(), any::<u64>()).prop_map(|(r, o, c)| {
            let usage = json!({"output_tokens": o, "cache_creation_input_tokens": c});
            json!({"type": "message_delta", "delta": {"stop_reason": r}, "usage": usage}).to_string()
        }),
        Just(json!({"type": "message_stop"}).to_string()),
    ]
}

fn arb_content() -> impl Strategy<Value = Value> {
    let part = prop_oneof![
        ".{0,8}".prop_map(|t| json!({"type": "text", "text": t})),
        prop_oneof![
            Just("data:image/png;base64,AAAA"),
            Just("https://x/y.png"),
            Just("data:,x"),
            Just("nope"),
            Just("data:image/tiff;base64,AA"),
            Just("data:image/png;charset=x;base64,")
        ]
        .prop_map(|u| json!({"type": "image_url", "image_url": {"url": u}})),
        Just(json!({"type": "input_audio", "input_audio": {}})),
        Just(json!({"type": "file", "file": {}})),
    ];
    prop_oneof![
        Just(Value::Null),
        ".{0,10}".prop_map(Value::from),
        prop::collection::vec(part, 0..4).prop_map(Value::Array)
    ]
}

fn arb_message() -> impl Strategy<Value = Value> {
    let role = prop::sample::select(&["system", "developer", "user", "assistant", "tool", "function", "other"][..]);
    let arguments = prop_oneof![
        Just("{}".to_owned()),
        Just(String::new()),
        Just("[1]".to_owned()),
        ".{0,10}",
        arb_json().prop_map(|v| v.to_string())
    ];
    let calls = prop::option::of(prop::collection::vec(arguments, 0..3));
    (role, arb_content(), calls, prop::option::of("[a-z]{0,4}")).prop_map(|(role, content, calls, id)| {
        let mut m = json!({"role": role, "content": content});
        if let Some(calls) = calls {
            let calls: Vec<Value> = calls
                .into_iter()
                .map(|a| {
                    json!({"id": "c", "type": "function",
                "function": {"name": "f", "arguments": a}})
                })
                .collect();
            m["tool_calls"] = Value::Array(calls);
        }
        if let Some(id) = id {
            m["tool_call_id"] = json!(id);
        }
        m
    })
}

/// Chat request bodies: shaped mostly right, with arbitrary values in the risky places.
fn arb_request() -> impl Strategy<Value = Value> {
    let tool_choice = prop_oneof![
        Just(json!("auto")),
        Just(json!("required")),
        Just(json!("none")),
        Just(json!("x")),
        Just(json!({"type": "function", "function": {"name": "f"}})),
        arb_json()
    ];
    let format = prop_oneof![
        Just(json!({"type": "json_object"})),
        Just(json!({"type": "json_schema"})),
        arb_json().prop_map(|s| json!({"type": "json_schema", "json_schema": {"name": "n", "schema": s}})),
        arb_json()
    ];
    let tools = prop::collection::vec((prop_oneof![Just("function"), Just("custom")], arb_json()), 0..3);
    (
        prop::collection::vec(arb_message(), 0..6),
        any::<Option<u32>>(),
        any::<Option<f64>>(),
        tool_choice,
        format,
        tools,
        arb_json(),
    )
        .prop_map(|(messages, n, temperature, tool_choice, format, tools, stop)| {
            let tools: Vec<Value> = tools
                .into_iter()
                .map(|(kind, params)| {
                    json!({"type": kind,
                "function": {"name": "f", "parameters": params}})
                })
                .collect();
            json!({"model": "m", "messages": messages, "n": n, "temperature": temperature, "tool_choice": tool_choice,
                "response_format": format, "tools": tools, "stop": stop, "parallel_tool_calls": false})
        })
}

proptest! {
    #[test]
    fn stream_translator_never_panics(events in prop::collection::vec((arb_event_name(), arb_event_data()), 0..30)) {
        let mut translator = StreamTranslator::new(1);
        for (event, data) in &events {
            let _ = translator.push(event, data);
        }
    }

    #[test]
    fn request_conversion_never_panics(body in prop_oneof![arb_request(), arb_json()]) {
        if let Ok(req) = serde_json::from_value::<ChatCompletionRequest>(body) {
            if let Ok(converted) = to_messages_request(&req, "m", 16) {
                serde_json::to_string(&converted).unwrap();
            }
        }
    }

    #[test]
    fn response_conversion_never_panics(body in arb_json(), usage in (any::<u64>(), any::<u64>(), any::<u64>())) {
        let mut body = body;
        if let Value::Object(map) = &mut body {
            map.insert("id".to_owned(), json!("x"));
            map.insert("model".to_owned(), json!("y"));
            map.insert("usage".to_owned(), json!({"input_tokens": usage.0, "output_tokens": usage.1,
                "cache_read_input_tokens": usage.2, "cache_creation_input_tokens": usage.2}));
        }
        if let Ok(resp) = serde_json::from_value::<MessagesResponse>(body) {
            let _ = from_messages_response(resp, 0);
        }
    }
}
