//! limen: a TLS-terminating reverse proxy with passive hot reload.
//!
//! Data flows one way: files -> `config`/`tls` loaders -> `reload` builds a `state::Snapshot` ->
//! `state::Shared::publish` stores it in the `ArcSwap` -> each handshake (`tls`, via `server`) and
//! request (`proxy`) reads it. Imports point down the layers only (checked by tests/layers.rs):
//! normalize; config, metrics, tickets; error, tls, headers, watch, io, proxyproto; body; upstream; routing; state; reload, proxy,
//! admin; server. See docs/architecture.md.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod config;
pub mod error;
pub mod headers;
pub mod io;
pub mod metrics;
pub mod normalize;
pub mod proxy;
pub mod proxyproto;
pub mod ratelimit;
pub mod reload;
pub mod routing;
pub mod server;
pub mod state;
pub mod tickets;
pub mod tls;
pub mod upstream;
pub mod watch;
