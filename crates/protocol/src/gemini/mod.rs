//! Gemini (Generative Language API `v1beta`) wire types and the pure conversions between them
//! and OpenAI shapes:
//!
//! * [`to_generate_content`]: chat request → `generateContent` request ([`request`]);
//! * [`from_generate_content`]: `generateContent` response → chat completion ([`response`]);
//! * [`StreamTranslator`]: `streamGenerateContent?alt=sse` events → chat chunks ([`stream`]);
//! * [`to_batch_embed`] / [`from_batch_embed`]: embeddings ([`embed`]);
//! * [`schema::to_gemini_schema`]: JSON Schema → the subset Gemini accepts.

pub mod embed;
pub mod request;
pub mod response;
pub mod schema;
pub mod stream;
pub mod types;

pub use embed::{from_batch_embed, model_resource, to_batch_embed};
pub use request::to_generate_content;
pub use response::from_generate_content;
pub use stream::{StreamStep, StreamTranslator};
pub use types::*;

/// The protocol's name in errors.
pub(crate) const PROTOCOL: &str = "Gemini";
