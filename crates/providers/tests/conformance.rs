//! One conformance suite, run for every upstream kind against the in-repo fake upstream
//! (`mock-upstream`): chat (plain, streamed, tools, JSON mode, stop / max tokens), error
//! classification, broken and dropped streams, per-call keys, embeddings and legacy
//! completions. `conformance_suite!` expands the cases of `conformance/cases.rs` into one
//! `#[tokio::test]` per case in a module named after the provider; each provider declares its
//! [`Capabilities`](support::Capabilities) so the suite skips what does not apply.
//!
//! Then OpenAI-only behaviour (`openai_only`: pass-through, stream options, auth header
//! variants, in-band errors) and the built-in sandbox (`sandbox`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "conformance/cases.rs"]
mod cases;
#[path = "conformance/openai_only.rs"]
mod openai_only;
#[path = "conformance/sandbox.rs"]
mod sandbox;
#[path = "conformance/support.rs"]
mod support;

/// `conformance_suite!(module, ProviderKind::X, |mock| mock.x_base(), Capabilities { .. })`:
/// the same tests for one provider kind.
macro_rules! conformance_suite {
    ($provider:ident, $kind:expr, $base:expr, $caps:expr $(,)?) => {
        mod $provider {
            use marga_providers::ProviderKind;

            use super::support::{BaseUrl, Capabilities, Fixture};

            async fn fixture() -> Fixture {
                let base: BaseUrl = $base;
                let caps: Capabilities = $caps;
                Fixture::start($kind, caps, base).await
            }

            conformance_suite!(@cases
                chat_text,
                chat_stream_text,
                tool_call,
                tool_call_stream,
                tool_round_trip,
                system_and_multi_turn,
                stop_and_max_tokens,
                json_mode,
                error_server,
                error_rate_limited,
                error_auth,
                error_invalid_request,
                error_malformed,
                error_connect_refused,
                stream_cut,
                stream_in_band_error,
                stream_drop_cancels_upstream,
                api_key_override,
                embeddings,
                completions,
                completions_stream,
            );
        }
    };
    (@cases $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                super::cases::$case(&fixture().await).await;
            }
        )*
    };
}

conformance_suite!(
    openai,
    ProviderKind::Openai,
    |mock| mock.openai_base(),
    Capabilities { embeddings: true, native_completions: true, json_mode: true },
);

// JSON mode is emulated with a system instruction, which the mock does not follow.
conformance_suite!(
    anthropic,
    ProviderKind::Anthropic,
    |mock| mock.anthropic_base(),
    Capabilities { embeddings: false, native_completions: false, json_mode: false },
);

conformance_suite!(
    gemini,
    ProviderKind::Gemini,
    |mock| mock.gemini_base(),
    Capabilities { embeddings: true, native_completions: false, json_mode: true },
);
