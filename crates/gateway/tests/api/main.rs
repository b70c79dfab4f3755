//! End-to-end tests of the gateway: the real [`marga_gateway::app::App`] on port 0 with a fresh
//! data directory, in front of `mock-upstream` servers on port 0. One binary, one module per
//! area; every test starts its own app (see `helpers::spawn_app`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod accounts;
mod batch;
mod batch_crash;
mod batch_lanes;
mod batch_native;
mod batch_webhook;
mod batch_webhook_secrets;
mod breakers;
mod chains;
mod chat;
mod crash;
mod embeddings;
mod errors;
mod extensions;
mod failover;
mod helpers;
mod members;
mod models;
mod observability;
mod ops;
mod request_log;
mod residency;
mod routing;
mod scale_out;
mod streaming;
mod test_db;
mod usage;
