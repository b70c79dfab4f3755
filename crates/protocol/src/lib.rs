//! Wire types for the protocols Marga speaks (OpenAI, Anthropic, Gemini) and the pure
//! conversions between them, streaming included.
//!
//! Architecture invariant: this crate does no IO. No tokio, no HTTP, no clock; every
//! conversion is a function from input to `Result<output, ConvertError>`, and every stream
//! translator is a state machine fed one upstream event at a time.

pub mod answer;
pub mod anthropic;
pub mod error;
pub mod gemini;
pub mod legacy;
pub mod openai;
pub mod relayed;
pub mod routing;
pub mod sse;

pub use error::ConvertError;
