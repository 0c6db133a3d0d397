//! limen: a TLS-terminating reverse proxy with passive hot reload.
//!
//! Data flows one way: files -> `config`/`tls` loaders -> `reload::Snapshot` -> `ArcSwap` in
//! `server::Shared` -> each handshake (`tls`) and request (`proxy`). See docs/architecture.md.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod metrics;
pub mod normalize;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod tls;
pub mod upstream;
