//! The error every conversion returns.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConvertError {
    /// The request uses something the target protocol cannot express.
    #[error("{what} is not supported by {protocol}")]
    Unsupported { protocol: &'static str, what: String },
    /// The request is well-formed JSON but semantically invalid (names the field).
    #[error("invalid value for `{param}`: {message}")]
    InvalidParam { param: String, message: String },
    /// An upstream payload did not have the documented shape.
    #[error("malformed {protocol} payload: {source}")]
    Malformed {
        protocol: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl ConvertError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ConvertError::InvalidParam { param: param.into(), message: message.into() }
    }
}
