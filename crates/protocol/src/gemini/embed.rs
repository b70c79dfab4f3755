//! OpenAI embeddings ↔ Gemini `batchEmbedContents`.
//!
//! Every input text becomes one request of the batch; `dimensions` becomes
//! `outputDimensionality`. Gemini reports no token counts, so the response has no `usage` (the
//! gateway counts input tokens itself). With `encoding_format: "base64"` (what the official
//! OpenAI Python SDK asks for by default) each vector is sent as base64 of its little-endian
//! `f32`s, exactly as OpenAI encodes it.

use super::types::{BatchEmbedContentsRequest, BatchEmbedContentsResponse, Content, EmbedContentRequest, Part};
use crate::openai::{Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingVector, Extra};

/// The batch request embedding every input of `req` with `upstream_model`.
pub fn to_batch_embed(req: &EmbeddingRequest, upstream_model: &str) -> BatchEmbedContentsRequest {
    let model = model_resource(upstream_model);
    let requests = req
        .input
        .texts()
        .into_iter()
        .map(|text| EmbedContentRequest {
            model: Some(model.clone()),
            content: Content { role: None, parts: vec![Part::text(text)], extra: Extra::new() },
            task_type: None,
            output_dimensionality: req.dimensions,
            extra: Extra::new(),
        })
        .collect();
    BatchEmbedContentsRequest { requests }
}

/// The OpenAI embeddings response for Gemini's batch answer; `encoding_format` is the client's
/// (`"base64"` or anything else for float arrays).
pub fn from_batch_embed(
    resp: BatchEmbedContentsResponse,
    model: &str,
    encoding_format: Option<&str>,
) -> EmbeddingResponse {
    let base64 = encoding_format == Some("base64");
    let data = resp
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(i, embedding)| Embedding {
            object: "embedding".to_owned(),
            index: u32::try_from(i).unwrap_or(u32::MAX),
            embedding: if base64 {
                EmbeddingVector::base64_of_floats(&embedding.values)
            } else {
                EmbeddingVector::floats(&embedding.values)
            },
        })
        .collect();
    EmbeddingResponse { object: "list".to_owned(), data, model: model.to_owned(), usage: None, extra: Extra::new() }
}

/// `models/<model>`, whether or not the name already has the prefix.
pub fn model_resource(model: &str) -> String {
    format!("models/{}", model.strip_prefix("models/").unwrap_or(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(EmbeddingVector::base64_of_floats(&[1.0, -2.0]).json(), "\"AACAPwAAAMA=\"");
    }

    #[test]
    fn model_prefix_is_not_doubled() {
        assert_eq!(model_resource("text-embedding-004"), "models/text-embedding-004");
        assert_eq!(model_resource("models/text-embedding-004"), "models/text-embedding-004");
    }
}
