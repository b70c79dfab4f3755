//! Anthropic Messages API (version `2023-06-01`): wire types and the pure conversions to and
//! from OpenAI chat, streaming included.
//!
//! * [`to_messages_request`]: an OpenAI chat request as a Messages request.
//! * [`from_messages_response`]: a Messages response as an OpenAI chat completion.
//! * [`StreamTranslator`]: Messages SSE events in, OpenAI `chat.completion.chunk`s out.
//!
//! What does not carry over, by design:
//! * Anthropic has no JSON mode. `response_format` `json_object` / `json_schema` is emulated by
//!   appending an instruction (with the schema, for `json_schema`) to the system prompt; the
//!   model usually complies but nothing enforces it.
//! * OpenAI-only parameters (`seed`, penalties, `logprobs`, `logit_bias`, anything in `extra`…)
//!   are dropped: the request is built from known fields only.
//! * `temperature` is clamped to Anthropic's range, 0 to 1.
//! * Thinking blocks come back as `message.reasoning` (OpenRouter's spelling); their
//!   signatures are not kept, so they cannot be replayed in a later turn.

mod request;
mod response;
mod stream;
mod types;

pub use request::to_messages_request;
pub use response::{finish_reason, from_messages_response, openai_usage};
pub use stream::{StreamStep, StreamTranslator};
pub use types::*;
