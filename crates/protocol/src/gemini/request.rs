//! OpenAI chat request → Gemini `generateContent` request.
//!
//! * `system`/`developer` messages, wherever they are, become `systemInstruction` (Gemini has
//!   one system prompt); `assistant` becomes role `model`; `tool` (and legacy `function`)
//!   results become `functionResponse` parts of a `user` turn; consecutive turns of the same
//!   role are merged, as Gemini expects alternating turns. Empty texts are left out (Gemini
//!   refuses empty text parts) and so are turns left with no part.
//! * Gemini matches a function result to its call by function name, which OpenAI tool messages
//!   lack: it is recovered from the latest earlier assistant tool call with that id.
//! * Function call ids are not sent: ids minted by OpenAI clients mean nothing to Gemini, which
//!   pairs calls and results by name and order.
//! * The first function call of each model turn carries Gemini's documented placeholder thought
//!   signature: Gemini 3 refuses function-call history without one, and OpenAI history cannot
//!   carry the real signature back (older models ignore the field).
//! * Schemas (`parameters`, `response_format.json_schema`) go through [`to_gemini_schema`].
//! * OpenAI-only parameters (`parallel_tool_calls`, `user`, `logprobs`, anything in `extra`)
//!   are not sent.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::schema::{is_empty_object, to_gemini_schema};
use super::types::{
    Content, FunctionCall, FunctionCallingConfig, FunctionCallingMode, FunctionDeclaration, FunctionResponse,
    GenerateContentRequest, GenerationConfig, Part, Tool, ToolConfig,
};
use super::PROTOCOL;
use crate::error::ConvertError;
use crate::openai::{
    ChatCompletionRequest, ChatMessage, ContentPart, Extra, MessageContent, ResponseFormat, Role, ToolChoice,
};

const USER: &str = "user";
const MODEL: &str = "model";
/// Gemini's documented stand-in for a thought signature the client could not keep.
const PLACEHOLDER_SIGNATURE: &str = "skip_thought_signature_validator";

/// The Gemini request that asks for the same completion as `req`.
pub fn to_generate_content(req: &ChatCompletionRequest) -> Result<GenerateContentRequest, ConvertError> {
    let mut turns = Turns::default();
    for (i, message) in req.messages.iter().enumerate() {
        turns.push_message(message, i)?;
    }
    let tools = convert_tools(req)?;
    let tool_config = if tools.is_empty() { None } else { tool_config(req.tool_choice.as_ref())? };
    let system_instruction =
        (!turns.system.is_empty()).then(|| Content { role: None, parts: turns.system, extra: Extra::new() });
    Ok(GenerateContentRequest {
        contents: turns.contents,
        system_instruction,
        tools,
        tool_config,
        generation_config: generation_config(req)?,
        safety_settings: None,
        extra: Extra::new(),
    })
}

/// The conversation being built.
#[derive(Default)]
struct Turns {
    system: Vec<Part>,
    contents: Vec<Content>,
    /// Function name of each assistant tool call seen so far, by call id.
    call_names: HashMap<String, String>,
}

impl Turns {
    fn push_message(&mut self, message: &ChatMessage, i: usize) -> Result<(), ConvertError> {
        match message.role {
            Role::System | Role::Developer => {
                let text = message.text_content();
                if !text.is_empty() {
                    self.system.push(Part::text(text));
                }
            }
            Role::User => {
                let parts = user_parts(message.content.as_ref(), i)?;
                self.push(USER, parts);
            }
            Role::Assistant => {
                let parts = self.assistant_parts(message, i)?;
                self.push(MODEL, parts);
            }
            Role::Tool => {
                let part = self.tool_result(message, i)?;
                self.push(USER, vec![part]);
            }
            Role::Function => {
                let name = message.name.clone().ok_or_else(|| {
                    ConvertError::invalid(format!("messages[{i}].name"), "is required for function messages")
                })?;
                self.push(USER, vec![function_response(name, &message.text_content())]);
            }
        }
        Ok(())
    }

    /// Appends `parts` as a turn of `role`, merged into the previous turn if it has that role.
    fn push(&mut self, role: &str, parts: Vec<Part>) {
        if parts.is_empty() {
            return;
        }
        match self.contents.last_mut() {
            Some(last) if last.role.as_deref() == Some(role) => last.parts.extend(parts),
            _ => self.contents.push(Content::new(role, parts)),
        }
    }

    /// Text, then one `functionCall` part per tool call (arguments parsed).
    fn assistant_parts(&mut self, message: &ChatMessage, i: usize) -> Result<Vec<Part>, ConvertError> {
        let mut parts = Vec::new();
        let text = message.text_content();
        if !text.is_empty() {
            parts.push(Part::text(text));
        }
        for (j, call) in message.tool_calls.iter().flatten().enumerate() {
            let param = format!("messages[{i}].tool_calls[{j}].function.arguments");
            let args = parse_arguments(&call.function.arguments, param)?;
            self.call_names.insert(call.id.clone(), call.function.name.clone());
            let function_call =
                FunctionCall { id: None, name: call.function.name.clone(), args: Some(args), extra: Extra::new() };
            let thought_signature = (j == 0).then(|| PLACEHOLDER_SIGNATURE.to_owned());
            parts.push(Part { function_call: Some(function_call), thought_signature, ..Part::default() });
        }
        Ok(parts)
    }

    /// A `tool` message as a `functionResponse`, named after the call it answers.
    fn tool_result(&self, message: &ChatMessage, i: usize) -> Result<Part, ConvertError> {
        let param = format!("messages[{i}].tool_call_id");
        let id = message
            .tool_call_id
            .as_deref()
            .ok_or_else(|| ConvertError::invalid(param.clone(), "is required for tool messages"))?;
        let name = self.call_names.get(id).ok_or_else(|| {
            ConvertError::invalid(param, format!("`{id}` does not match any earlier assistant tool call"))
        })?;
        Ok(function_response(name.clone(), &message.text_content()))
    }
}

/// A function result: the text itself when it is a JSON object, else `{"content": text}`.
fn function_response(name: String, text: &str) -> Part {
    let response = match serde_json::from_str::<Value>(text) {
        Ok(object @ Value::Object(_)) => object,
        _ => {
            let mut wrapped = Map::new();
            wrapped.insert("content".to_owned(), Value::String(text.to_owned()));
            Value::Object(wrapped)
        }
    };
    let function_response = FunctionResponse { id: None, name, response, extra: Extra::new() };
    Part { function_response: Some(function_response), ..Part::default() }
}

/// Tool call arguments as the JSON object Gemini wants; an empty string means no arguments.
fn parse_arguments(raw: &str, param: String) -> Result<Value, ConvertError> {
    if raw.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(object @ Value::Object(_)) => Ok(object),
        Ok(_) => Err(ConvertError::invalid(param, "must be a JSON object")),
        Err(e) => Err(ConvertError::invalid(param, format!("is not valid JSON: {e}"))),
    }
}

fn user_parts(content: Option<&MessageContent>, i: usize) -> Result<Vec<Part>, ConvertError> {
    match content {
        None => Ok(Vec::new()),
        Some(MessageContent::Text(text)) if text.is_empty() => Ok(Vec::new()),
        Some(MessageContent::Text(text)) => Ok(vec![Part::text(text.clone())]),
        Some(MessageContent::Parts(parts)) => parts
            .iter()
            .enumerate()
            .filter(|(_, p)| !matches!(p, ContentPart::Text { text } if text.is_empty()))
            .map(|(j, p)| content_part(p, &format!("messages[{i}].content[{j}]")))
            .collect(),
    }
}

fn content_part(part: &ContentPart, param: &str) -> Result<Part, ConvertError> {
    match part {
        ContentPart::Text { text } => Ok(Part::text(text.clone())),
        ContentPart::ImageUrl { image_url } => image_part(&image_url.url, &format!("{param}.image_url.url")),
        ContentPart::InputAudio { input_audio } => audio_part(input_audio, param),
        ContentPart::File { file } => file_part(file, param),
    }
}

/// A data URL becomes inline bytes; an `http(s)`/`gs` URL becomes file data with a MIME type
/// guessed from the extension.
fn image_part(url: &str, param: &str) -> Result<Part, ConvertError> {
    if url.starts_with("data:") {
        let (mime, data) = parse_data_url(url, param)?;
        return Ok(Part::inline_data(if mime.is_empty() { "image/jpeg" } else { mime }, data));
    }
    let lower = url.to_ascii_lowercase();
    if ["https://", "http://", "gs://"].iter().any(|scheme| lower.starts_with(scheme)) {
        return Ok(Part::file_data(guess_mime(&lower), url));
    }
    Err(ConvertError::invalid(param, "must be a data URL or an http(s) URL"))
}

/// `data:<mime>;base64,<data>` → (mime, data).
fn parse_data_url<'a>(url: &'a str, param: &str) -> Result<(&'a str, &'a str), ConvertError> {
    let rest = url.strip_prefix("data:").unwrap_or(url);
    let (meta, data) = rest.split_once(',').ok_or_else(|| ConvertError::invalid(param, "is not a valid data URL"))?;
    let mime =
        meta.strip_suffix(";base64").ok_or_else(|| ConvertError::invalid(param, "data URLs must be base64-encoded"))?;
    Ok((mime, data))
}

/// The MIME type an URL's extension suggests (query and fragment ignored); JPEG by default.
fn guess_mime(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let extension = path.rsplit_once('.').map_or("", |(_, ext)| ext);
    match extension {
        "png" => "image/png",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "heif" => "image/heif",
        "pdf" => "application/pdf",
        _ => "image/jpeg",
    }
}

/// `{"data": base64, "format": "wav"|"mp3"|…}` → inline `audio/<format>`.
fn audio_part(input: &Value, param: &str) -> Result<Part, ConvertError> {
    let data = input
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| ConvertError::invalid(format!("{param}.input_audio.data"), "is required"))?;
    let format = input.get("format").and_then(Value::as_str).unwrap_or("wav");
    Ok(Part::inline_data(format!("audio/{format}"), data))
}

/// `{"file_data": "data:…;base64,…"}` → inline bytes. Uploaded OpenAI files (`file_id`) do
/// not exist on Gemini.
fn file_part(file: &Value, param: &str) -> Result<Part, ConvertError> {
    let Some(url) = file.get("file_data").and_then(Value::as_str) else {
        return Err(ConvertError::Unsupported { protocol: PROTOCOL, what: format!("{param}: file_id") });
    };
    let param = format!("{param}.file.file_data");
    if url.starts_with("data:") {
        let (mime, data) = parse_data_url(url, &param)?;
        return Ok(Part::inline_data(if mime.is_empty() { "application/pdf" } else { mime }, data));
    }
    // A bare base64 payload, assumed to be a PDF (the one file type OpenAI accepts inline).
    Ok(Part::inline_data("application/pdf", url.trim()))
}

/// All function tools as one Gemini tool.
fn convert_tools(req: &ChatCompletionRequest) -> Result<Vec<Tool>, ConvertError> {
    let declarations = req
        .tools
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, tool)| {
            if tool.kind != "function" {
                let what = format!("tools[{i}].type `{}`", tool.kind);
                return Err(ConvertError::Unsupported { protocol: PROTOCOL, what });
            }
            let parameters = tool.function.parameters.as_ref().map(to_gemini_schema).filter(|p| !is_empty_object(p));
            Ok(FunctionDeclaration {
                name: tool.function.name.clone(),
                description: tool.function.description.clone(),
                parameters,
                extra: Extra::new(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if declarations.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![Tool { function_declarations: declarations, extra: Extra::new() }])
}

/// `tool_choice` → function calling mode: auto → AUTO, none → NONE, required → ANY, a named
/// function → ANY restricted to that name.
fn tool_config(choice: Option<&ToolChoice>) -> Result<Option<ToolConfig>, ConvertError> {
    let (mode, allowed) = match choice {
        None => return Ok(None),
        Some(ToolChoice::Mode(mode)) => match mode.as_str() {
            "auto" => (FunctionCallingMode::Auto, None),
            "none" => (FunctionCallingMode::None, None),
            "required" => (FunctionCallingMode::Any, None),
            other => {
                let message = format!("`{other}` is not one of none, auto, required");
                return Err(ConvertError::invalid("tool_choice", message));
            }
        },
        Some(ToolChoice::Named(named)) => (FunctionCallingMode::Any, Some(vec![named.function.name.clone()])),
    };
    let config = FunctionCallingConfig { mode: Some(mode), allowed_function_names: allowed, extra: Extra::new() };
    Ok(Some(ToolConfig { function_calling_config: Some(config), extra: Extra::new() }))
}

/// Sampling parameters, output cap, stop sequences and answer format; `None` if all unset.
fn generation_config(req: &ChatCompletionRequest) -> Result<Option<GenerationConfig>, ConvertError> {
    let mut config = GenerationConfig {
        temperature: req.temperature,
        top_p: req.top_p,
        max_output_tokens: req.output_cap(),
        stop_sequences: req.stop.as_ref().map(|s| s.to_vec()).filter(|s| !s.is_empty()),
        candidate_count: req.n,
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        ..GenerationConfig::default()
    };
    if let Some(format) = &req.response_format {
        apply_response_format(&mut config, format)?;
    }
    Ok((config != GenerationConfig::default()).then_some(config))
}

/// `json_object` → JSON MIME type; `json_schema` → JSON MIME type and the converted schema.
fn apply_response_format(config: &mut GenerationConfig, format: &ResponseFormat) -> Result<(), ConvertError> {
    match format.kind.as_str() {
        "text" => {}
        "json_object" => config.response_mime_type = Some("application/json".to_owned()),
        "json_schema" => {
            let spec = format.json_schema.as_ref().ok_or_else(|| {
                ConvertError::invalid("response_format.json_schema", "is required when type is json_schema")
            })?;
            config.response_mime_type = Some("application/json".to_owned());
            config.response_schema = spec.schema.as_ref().map(to_gemini_schema);
        }
        other => {
            let message = format!("`{other}` is not one of text, json_object, json_schema");
            return Err(ConvertError::invalid("response_format.type", message));
        }
    }
    Ok(())
}
