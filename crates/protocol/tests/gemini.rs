//! Gemini conversions, driven by fixtures: every OpenAI request under
//! `fixtures/gemini/request/`, Gemini response under `response/` and recorded Gemini SSE
//! transcript under `stream/` is converted and compared with its insta snapshot
//! (`snapshots/gemini__<kind>_<file>.snap`). Property tests check that no input panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use marga_protocol::gemini::{
    from_batch_embed, from_generate_content, to_batch_embed, to_generate_content, BatchEmbedContentsResponse,
    ContentEmbedding, GenerateContentResponse, StreamStep, StreamTranslator,
};
use marga_protocol::openai::{
    ChatCompletionRequest, ChatMessage, ContentPart, EmbeddingInput, EmbeddingRequest, Extra, FunctionCall,
    FunctionDefinition, ImageUrl, JsonSchemaFormat, MessageContent, ResponseFormat, Role, Tool, ToolCall, ToolChoice,
};
use proptest::prelude::*;
use serde_json::{json, Value};

const CREATED: u64 = 1_700_000_000;

fn fixtures(kind: &str, extension: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemini").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Each OpenAI request → its Gemini request (or the conversion error).
fn check_requests() {
    for path in fixtures("request", "json") {
        let request: ChatCompletionRequest = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let converted = match to_generate_content(&request) {
            Ok(gemini) => serde_json::to_value(gemini).unwrap(),
            Err(error) => json!({ "error": error.to_string() }),
        };
        insta::assert_json_snapshot!(format!("request_{}", stem(&path)), converted);
    }
}

/// Each Gemini response → its OpenAI chat completion (or the conversion error).
fn check_responses() {
    for path in fixtures("response", "json") {
        let response: GenerateContentResponse = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let converted = match from_generate_content(response, "gemini-test", CREATED, "chatcmpl-test".into()) {
            Ok(chat) => serde_json::to_value(chat).unwrap(),
            Err(error) => json!({ "error": error.to_string() }),
        };
        insta::assert_json_snapshot!(format!("response_{}", stem(&path)), converted);
    }
}

/// The `data:` payloads of an SSE transcript, event by event.
fn sse_data(transcript: &str) -> Vec<String> {
    transcript
        .replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(|event| {
            let lines: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| data.strip_prefix(' ').unwrap_or(data))
                .collect();
            (!lines.is_empty()).then(|| lines.join("\n"))
        })
        .collect()
}

/// Feeds a transcript to a translator as the provider does: stop at the first error, else
/// call `finish()` at the end.
fn translate_transcript(transcript: &str) -> Value {
    let mut translator = StreamTranslator::new("gemini-test", CREATED, "chatcmpl-stream".into());
    let mut events = Vec::new();
    for data in sse_data(transcript) {
        match translator.push(&data) {
            StreamStep::Chunks(chunks) => events.push(serde_json::to_value(chunks).unwrap()),
            StreamStep::Error { message, kind } => {
                events.push(json!({ "error": { "message": message, "kind": kind } }));
                return json!({ "events": events, "finish": null });
            }
        }
    }
    json!({ "events": events, "finish": translator.finish() })
}

/// Each recorded Gemini stream → the chunks emitted per event, then by `finish()`.
fn check_streams() {
    for path in fixtures("stream", "sse") {
        let transcript = std::fs::read_to_string(&path).unwrap();
        insta::assert_json_snapshot!(format!("stream_{}", stem(&path)), translate_transcript(&transcript));
    }
}

#[test]
fn requests() {
    check_requests();
}

#[test]
fn responses() {
    check_responses();
}

#[test]
fn streams() {
    check_streams();
}

#[test]
fn invalid_tool_arguments_name_the_field() {
    let request: ChatCompletionRequest = serde_json::from_value(json!({
        "model": "m",
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}
        ]
    }))
    .unwrap();
    let error = to_generate_content(&request).unwrap_err().to_string();
    assert!(error.contains("messages[1].tool_calls[0]"), "{error}");
}

#[test]
fn tool_result_takes_the_latest_call_with_its_id() {
    // Gemini's generated ids (`call_0`) repeat from one answer to the next.
    let call = |name: &str| ToolCall {
        id: "call_0".into(),
        kind: "function".into(),
        function: FunctionCall { name: name.into(), arguments: "{}".into() },
    };
    let assistant =
        |name: &str| ChatMessage { tool_calls: Some(vec![call(name)]), ..ChatMessage::text(Role::Assistant, "") };
    let result = ChatMessage { tool_call_id: Some("call_0".into()), ..ChatMessage::text(Role::Tool, "ok") };
    let request = ChatCompletionRequest {
        messages: vec![assistant("first"), result.clone(), assistant("second"), result],
        ..ChatCompletionRequest::default()
    };
    let gemini = serde_json::to_value(to_generate_content(&request).unwrap()).unwrap();
    assert_eq!(gemini["contents"][1]["parts"][0]["functionResponse"]["name"], "first");
    assert_eq!(gemini["contents"][3]["parts"][0]["functionResponse"]["name"], "second");
}

#[test]
fn finish_is_owed_once() {
    let mut translator = StreamTranslator::new("m", CREATED, "id".into());
    let first = translator.finish();
    assert_eq!(first.len(), 1, "a finish chunk even for an empty stream");
    assert_eq!(first[0].choices[0].delta.role, Some(Role::Assistant));
    assert!(translator.finish().is_empty());
}

fn embedding_request(encoding_format: Option<&str>) -> EmbeddingRequest {
    EmbeddingRequest {
        model: "embed".into(),
        input: EmbeddingInput::Texts(vec!["alpha".into(), "beta".into()]),
        encoding_format: encoding_format.map(str::to_owned),
        dimensions: Some(3),
        user: Some("u".into()),
        extra: Extra::new(),
    }
}

#[test]
fn embeddings_request_has_one_entry_per_input() {
    let batch = to_batch_embed(&embedding_request(None), "text-embedding-004");
    assert_eq!(
        serde_json::to_value(batch).unwrap(),
        json!({"requests": [
            {"model": "models/text-embedding-004", "content": {"parts": [{"text": "alpha"}]}, "outputDimensionality": 3},
            {"model": "models/text-embedding-004", "content": {"parts": [{"text": "beta"}]}, "outputDimensionality": 3}
        ]})
    );
}

fn embeddings_answer() -> BatchEmbedContentsResponse {
    let embedding = |values: Vec<f64>| ContentEmbedding { values, extra: Extra::new() };
    BatchEmbedContentsResponse {
        embeddings: vec![embedding(vec![0.5, -1.0, 0.25]), embedding(vec![1.0, 0.0, 2.0])],
        extra: Extra::new(),
    }
}

#[test]
fn embeddings_as_floats() {
    let response = from_batch_embed(embeddings_answer(), "embed", Some("float"));
    assert_eq!(
        serde_json::to_value(response).unwrap(),
        json!({"object": "list", "model": "embed", "data": [
            {"object": "embedding", "index": 0, "embedding": [0.5, -1.0, 0.25]},
            {"object": "embedding", "index": 1, "embedding": [1.0, 0.0, 2.0]}
        ]})
    );
}

#[test]
fn embeddings_as_base64_little_endian_f32() {
    use base64::Engine as _;
    let response = from_batch_embed(embeddings_answer(), "embed", Some("base64"));
    let encoded = response.data[0].embedding.to_base64().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    let floats: Vec<f32> = bytes.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(floats, vec![0.5, -1.0, 0.25]);
    assert!(response.usage.is_none());
}

// === Property tests ===

/// Any JSON value, biased towards JSON Schema keys.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![Just("object".to_owned()), Just("#/$defs/a".to_owned()), Just("#".to_owned()), ".{0,6}"]
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        let key = prop_oneof![
            Just("type".to_owned()),
            Just("properties".to_owned()),
            Just("items".to_owned()),
            Just("anyOf".to_owned()),
            Just("$ref".to_owned()),
            Just("$defs".to_owned()),
            Just("a".to_owned()),
            Just("additionalProperties".to_owned()),
            "[a-z]{1,3}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn content() -> impl Strategy<Value = Option<MessageContent>> {
    let part = prop_oneof![
        ".{0,8}".prop_map(|text| ContentPart::Text { text }),
        prop_oneof![Just("data:image/png;base64,AAAA"), Just("data:"), Just("https://x/y.png"), Just("ftp://z")]
            .prop_map(|url| ContentPart::ImageUrl { image_url: ImageUrl { url: url.into(), detail: None } }),
        json_value().prop_map(|input_audio| ContentPart::InputAudio { input_audio }),
        json_value().prop_map(|file| ContentPart::File { file }),
    ];
    prop_oneof![
        Just(None),
        ".{0,8}".prop_map(|s| Some(MessageContent::Text(s))),
        prop::collection::vec(part, 0..3).prop_map(|p| Some(MessageContent::Parts(p))),
    ]
}

fn message() -> impl Strategy<Value = ChatMessage> {
    let role = prop_oneof![
        Just(Role::System),
        Just(Role::Developer),
        Just(Role::User),
        Just(Role::Assistant),
        Just(Role::Tool),
        Just(Role::Function)
    ];
    let id = prop_oneof![Just("a".to_owned()), Just("b".to_owned())];
    let arguments = prop_oneof![Just("{}".to_owned()), Just("{\"x\":1}".to_owned()), ".{0,6}"];
    let call = (id.clone(), "[a-z]{0,3}", arguments).prop_map(|(id, name, arguments)| ToolCall {
        id,
        kind: "function".into(),
        function: FunctionCall { name, arguments },
    });
    (
        role,
        content(),
        prop::option::of(prop::collection::vec(call, 0..3)),
        prop::option::of(id),
        prop::option::of("[a-z]{1,3}"),
    )
        .prop_map(|(role, content, tool_calls, tool_call_id, name)| ChatMessage {
            role,
            content,
            name,
            tool_calls,
            tool_call_id,
            extra: Extra::new(),
        })
}

fn request() -> impl Strategy<Value = ChatCompletionRequest> {
    let tool = ("[a-z]{1,3}", prop::option::of(json_value()), prop_oneof![Just("function"), Just("custom")]).prop_map(
        |(name, parameters, kind)| Tool {
            kind: kind.into(),
            function: FunctionDefinition { name, description: None, parameters, strict: None },
        },
    );
    let choice = prop_oneof!["[a-z]{0,8}".prop_map(ToolChoice::Mode), Just(ToolChoice::Mode("required".into())),];
    let format = (
        prop_oneof![Just("text"), Just("json_object"), Just("json_schema"), Just("xml")],
        prop::option::of(json_value()),
    )
        .prop_map(|(kind, schema)| ResponseFormat {
            kind: kind.into(),
            json_schema: schema.map(|schema| JsonSchemaFormat {
                name: "s".into(),
                description: None,
                schema: Some(schema),
                strict: None,
            }),
        });
    (
        prop::collection::vec(message(), 0..8),
        prop::option::of(prop::collection::vec(tool, 0..3)),
        prop::option::of(choice),
        prop::option::of(format),
    )
        .prop_map(|(messages, tools, tool_choice, response_format)| ChatCompletionRequest {
            messages,
            tools,
            tool_choice,
            response_format,
            ..ChatCompletionRequest::default()
        })
}

/// Stream payloads: arbitrary text, or JSON shaped like Gemini's (possibly wrongly).
fn stream_data() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        json_value().prop_map(|v| v.to_string()),
        (json_value(), prop::option::of(prop_oneof![Just("STOP"), Just("SAFETY"), Just("X")]), any::<u32>()).prop_map(
            |(args, finish, index)| json!({
                "candidates": [{"content": {"parts": [{"text": "t", "thought": index % 2 == 0}, {"functionCall": {"name": "f", "args": args}}]}, "finishReason": finish, "index": index % 3}],
                "usageMetadata": {"promptTokenCount": u64::MAX, "candidatesTokenCount": u64::MAX, "thoughtsTokenCount": index}
            })
            .to_string()
        ),
        Just(r#"{"error": "x"}"#.to_owned()),
        Just(r#"{"promptFeedback": {"blockReason": "OTHER"}}"#.to_owned()),
    ]
}

proptest! {
    #[test]
    fn stream_translator_never_panics(events in prop::collection::vec(stream_data(), 0..8)) {
        let mut translator = StreamTranslator::new("m", CREATED, "id".into());
        for data in &events {
            let _ = translator.push(data);
        }
        let _ = translator.finish();
    }

    #[test]
    fn request_conversion_never_panics(request in request()) {
        let _ = to_generate_content(&request);
    }

    #[test]
    fn response_conversion_never_panics(data in stream_data()) {
        if let Ok(response) = serde_json::from_str::<GenerateContentResponse>(&data) {
            let _ = from_generate_content(response, "m", CREATED, "id".into());
        }
    }
}
