//! OpenAI chat request → Anthropic Messages request.
//!
//! System and developer messages become `system`; tool results become user turns of
//! `tool_result` blocks; consecutive turns of the same role are merged, since Anthropic requires
//! user and assistant turns to alternate. JSON mode is emulated with a system instruction.

use serde_json::{Map, Value};

use super::types::{
    ContentBlock, ImageSource, Message, MessageContent, MessageRole, MessagesRequest, Metadata, SystemPrompt,
    ToolChoice, ToolDefinition,
};
use crate::error::ConvertError;
use crate::openai::{self, ChatCompletionRequest, ChatMessage, ContentPart, ResponseFormat, Role};

const PROTOCOL: &str = "Anthropic";

/// Image types the Messages API accepts.
const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Appended to the system prompt for `response_format` `json_object` and `json_schema`.
const JSON_INSTRUCTION: &str = "Respond only with a JSON object: no text before or after it and \
no Markdown code fences.";

/// The Messages request asking for what `req` asks for, sent to `upstream_model`.
///
/// `default_max_tokens` is the output cap when the client set none (Anthropic requires one).
/// Fails when the request uses something Anthropic cannot express (`n > 1`, audio or file
/// parts, non-function tools) or is invalid (tool call arguments that are not a JSON object,
/// an image URL that is neither `data:` nor http(s)).
pub fn to_messages_request(
    req: &ChatCompletionRequest,
    upstream_model: &str,
    default_max_tokens: u32,
) -> Result<MessagesRequest, ConvertError> {
    if req.n.is_some_and(|n| n > 1) {
        return Err(unsupported("`n` greater than 1"));
    }
    let (mut system, messages) = convert_messages(&req.messages)?;
    if let Some(instruction) = json_instruction(req.response_format.as_ref())? {
        system.push(instruction);
    }
    let tools = convert_tools(req.tools.as_deref())?;
    let tool_choice = match tools {
        Some(_) => convert_tool_choice(req.tool_choice.as_ref(), req.parallel_tool_calls)?,
        None => None,
    };
    let stop_sequences = req.stop.as_ref().map(openai::StopSequences::to_vec).filter(|s| !s.is_empty());
    Ok(MessagesRequest {
        model: upstream_model.to_owned(),
        max_tokens: req.output_cap().unwrap_or(default_max_tokens),
        system: (!system.is_empty()).then(|| SystemPrompt::Text(system.join("\n\n"))),
        messages,
        temperature: req.temperature.map(|t| t.clamp(0.0, 1.0)),
        top_p: req.top_p,
        stop_sequences,
        stream: req.stream,
        tools,
        tool_choice,
        metadata: req.user.clone().map(|user_id| Metadata { user_id: Some(user_id) }),
        ..MessagesRequest::default()
    })
}

fn unsupported(what: impl Into<String>) -> ConvertError {
    ConvertError::Unsupported { protocol: PROTOCOL, what: what.into() }
}

/// The system texts, in order, and the alternating turns.
fn convert_messages(messages: &[ChatMessage]) -> Result<(Vec<String>, Vec<Message>), ConvertError> {
    let mut system = Vec::new();
    let mut turns: Vec<(MessageRole, Vec<ContentBlock>)> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let (role, blocks) = match message.role {
            Role::System | Role::Developer => {
                let text = message.text_content();
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            Role::User => (MessageRole::User, content_blocks(message, i)?),
            Role::Assistant => (MessageRole::Assistant, assistant_blocks(message, i)?),
            Role::Tool => (MessageRole::User, vec![tool_result(message, i)?]),
            Role::Function => return Err(unsupported("the deprecated `function` role")),
        };
        match turns.last_mut() {
            _ if blocks.is_empty() => {}
            Some((last, previous)) if *last == role => previous.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    if turns.is_empty() {
        return Err(ConvertError::invalid("messages", "at least one user or assistant message is required"));
    }
    let messages = turns.into_iter().map(|(role, blocks)| Message { role, content: compact(blocks) }).collect();
    Ok((system, messages))
}

/// A lone text block is sent as a plain string.
fn compact(mut blocks: Vec<ContentBlock>) -> MessageContent {
    match blocks.as_mut_slice() {
        [ContentBlock::Text { text }] => MessageContent::Text(std::mem::take(text)),
        _ => MessageContent::Blocks(blocks),
    }
}

/// Text and image blocks of a message's content; empty texts are dropped (Anthropic refuses
/// them).
fn content_blocks(message: &ChatMessage, i: usize) -> Result<Vec<ContentBlock>, ConvertError> {
    let parts = match &message.content {
        None => return Ok(Vec::new()),
        Some(openai::MessageContent::Text(text)) => return Ok(text_block(text).into_iter().collect()),
        Some(openai::MessageContent::Parts(parts)) => parts,
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        match part {
            ContentPart::Text { text } => blocks.extend(text_block(text)),
            ContentPart::ImageUrl { image_url } => {
                let param = format!("messages[{i}].content[{j}].image_url.url");
                blocks.push(ContentBlock::Image { source: image_source(&image_url.url, &param)? });
            }
            ContentPart::InputAudio { .. } => return Err(unsupported("audio input")),
            ContentPart::File { .. } => return Err(unsupported("file input")),
        }
    }
    Ok(blocks)
}

fn text_block(text: &str) -> Option<ContentBlock> {
    (!text.is_empty()).then(|| ContentBlock::Text { text: text.to_owned() })
}

/// A `data:<type>;base64,<data>` URL as a base64 source, an http(s) URL as a URL source.
fn image_source(url: &str, param: &str) -> Result<ImageSource, ConvertError> {
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(ImageSource::Url { url: url.to_owned() });
    }
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ConvertError::invalid(param, "expected a data: URL or an http(s) URL"));
    };
    let Some((header, data)) = rest.split_once(',') else {
        return Err(ConvertError::invalid(param, "a data: URL needs a comma before its data"));
    };
    let Some(media_type) = header.strip_suffix(";base64") else {
        return Err(ConvertError::invalid(param, "only base64 data: URLs are supported"));
    };
    let media_type = media_type.split(';').next().unwrap_or_default().to_ascii_lowercase();
    if !IMAGE_TYPES.contains(&media_type.as_str()) {
        let message = format!("image type `{media_type}` is not one of {}", IMAGE_TYPES.join(", "));
        return Err(ConvertError::invalid(param, message));
    }
    Ok(ImageSource::Base64 { media_type, data: data.to_owned() })
}

/// An assistant message's text, then its tool calls as `tool_use` blocks.
fn assistant_blocks(message: &ChatMessage, i: usize) -> Result<Vec<ContentBlock>, ConvertError> {
    let mut blocks = content_blocks(message, i)?;
    for (j, call) in message.tool_calls.iter().flatten().enumerate() {
        let param = format!("messages[{i}].tool_calls[{j}].function.arguments");
        let arguments = call.function.arguments.trim();
        let input = if arguments.is_empty() {
            Value::Object(Map::new())
        } else {
            serde_json::from_str::<Value>(arguments)
                .map_err(|e| ConvertError::invalid(param.as_str(), format!("not valid JSON: {e}")))?
        };
        if !input.is_object() {
            return Err(ConvertError::invalid(param, "must be a JSON object"));
        }
        blocks.push(ContentBlock::ToolUse { id: call.id.clone(), name: call.function.name.clone(), input });
    }
    Ok(blocks)
}

/// A `tool` message as a `tool_result` block.
fn tool_result(message: &ChatMessage, i: usize) -> Result<ContentBlock, ConvertError> {
    let Some(id) = message.tool_call_id.clone() else {
        return Err(ConvertError::invalid(format!("messages[{i}].tool_call_id"), "required for tool messages"));
    };
    let text = message.text_content();
    let content = (!text.is_empty()).then_some(MessageContent::Text(text));
    Ok(ContentBlock::ToolResult { tool_use_id: id, content, is_error: None })
}

/// The system instruction that stands in for JSON mode, if one is asked for.
fn json_instruction(format: Option<&ResponseFormat>) -> Result<Option<String>, ConvertError> {
    let Some(format) = format else { return Ok(None) };
    match format.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(JSON_INSTRUCTION.to_owned())),
        "json_schema" => {
            let Some(spec) = &format.json_schema else {
                return Err(ConvertError::invalid("response_format.json_schema", "required for type json_schema"));
            };
            let mut text = format!("{JSON_INSTRUCTION} It must conform to the JSON Schema `{}`", spec.name);
            if let Some(description) = &spec.description {
                text.push_str(&format!(" ({description})"));
            }
            let schema = spec.schema.clone().unwrap_or_else(|| Value::Object(Map::new()));
            text.push_str(&format!(":\n{schema}"));
            Ok(Some(text))
        }
        other => Err(ConvertError::invalid("response_format.type", format!("unknown type `{other}`"))),
    }
}

/// Function tools as Anthropic tools; `None` when the client declared none.
fn convert_tools(tools: Option<&[openai::Tool]>) -> Result<Option<Vec<ToolDefinition>>, ConvertError> {
    let Some(tools) = tools.filter(|t| !t.is_empty()) else { return Ok(None) };
    let mut converted = Vec::with_capacity(tools.len());
    for tool in tools {
        if tool.kind != "function" {
            return Err(unsupported(format!("tool type `{}`", tool.kind)));
        }
        converted.push(ToolDefinition {
            name: tool.function.name.clone(),
            description: tool.function.description.clone(),
            input_schema: input_schema(tool.function.parameters.as_ref()),
        });
    }
    Ok(Some(converted))
}

/// The parameters schema, with the `"type": "object"` Anthropic insists on.
fn input_schema(parameters: Option<&Value>) -> Value {
    let mut schema = match parameters {
        Some(Value::Object(map)) => map.clone(),
        _ => Map::new(),
    };
    schema.entry("type").or_insert_with(|| Value::String("object".to_owned()));
    if schema.get("type").and_then(Value::as_str) == Some("object") {
        schema.entry("properties").or_insert_with(|| Value::Object(Map::new()));
    }
    Value::Object(schema)
}

/// `auto` → auto, `required` → any, `none` → none, a named function → tool;
/// `parallel_tool_calls: false` → `disable_parallel_tool_use`.
fn convert_tool_choice(
    choice: Option<&openai::ToolChoice>,
    parallel: Option<bool>,
) -> Result<Option<ToolChoice>, ConvertError> {
    let disable = (parallel == Some(false)).then_some(true);
    let converted = match choice {
        None if disable.is_some() => ToolChoice::Auto { disable_parallel_tool_use: disable },
        None => return Ok(None),
        Some(openai::ToolChoice::Mode(mode)) => match mode.as_str() {
            "auto" => ToolChoice::Auto { disable_parallel_tool_use: disable },
            "required" => ToolChoice::Any { disable_parallel_tool_use: disable },
            "none" => ToolChoice::None,
            other => return Err(ConvertError::invalid("tool_choice", format!("unknown mode `{other}`"))),
        },
        Some(openai::ToolChoice::Named(named)) => {
            ToolChoice::Tool { name: named.function.name.clone(), disable_parallel_tool_use: disable }
        }
    };
    Ok(Some(converted))
}
