//! The Marga gateway: configuration, the HTTP surface, routing, accounting and the request
//! log. `main.rs` is a thin shell over [`app::App`].

pub mod accounts;
pub mod admission;
pub mod app;
pub mod auth;
pub mod batch;
pub mod batch_window;
pub mod budget;
pub mod config;
pub mod error;
pub mod http;
pub mod journal;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod money;
pub mod pipeline;
pub mod registry;
pub mod request_log;
pub mod routing;
pub mod secrets;
pub mod serving;
pub mod telemetry;
pub mod tokens;
