//! Snapshots: building the immutable state that handshakes and requests read, from files on disk.
//!
//! Owns: turning a config file plus certificate files into a `Snapshot` (config half: route table;
//! cert half: certificate map and the rustls config over it), and the list of problems met on the
//! way. The metadata poller that rebuilds a half on change lives here too (next issue); it is the
//! only writer of the published snapshot after start. Must not touch: sockets, live connections.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;

use crate::config::{Config, ConfigError};
use crate::routing::RouteTable;
use crate::tls::{CertStore, TlsError, TlsShared};
use crate::upstream::UpstreamRegistry;

/// Everything one handshake or request needs, immutable once published.
#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one with every publish.
    pub generation: u64,
    pub config: Arc<Config>,
    pub routes: Arc<RouteTable>,
    pub certs: Arc<CertStore>,
    /// The rustls config serving `certs`; built once per snapshot, not per handshake.
    pub tls: Arc<ServerConfig>,
}

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{}", join_lines(.0))]
    Certs(Vec<TlsError>),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(rustls::Error),
}

fn join_lines(errs: &[TlsError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl LoadError {
    /// One message per problem, for `--check` and start-up.
    pub fn messages(&self) -> Vec<String> {
        match self {
            LoadError::Certs(v) => v.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// Loads the config file and every certificate it names, and builds generation `generation`.
/// Any certificate problem fails the whole load: at start, limen serves all it was told to or
/// nothing.
pub fn load_snapshot(
    path: &Path,
    generation: u64,
    tls: &TlsShared,
    registry: &UpstreamRegistry,
) -> Result<Snapshot, LoadError> {
    let config = Config::load(path)?;
    build_snapshot(config, generation, tls, registry)
}

pub fn build_snapshot(
    config: Config,
    generation: u64,
    tls: &TlsShared,
    registry: &UpstreamRegistry,
) -> Result<Snapshot, LoadError> {
    let (store, errors) = crate::tls::build_store(&config.tls, &config.routes, tls.provider());
    if !errors.is_empty() {
        return Err(LoadError::Certs(errors));
    }
    let certs = Arc::new(store);
    let server_config = tls
        .server_config(certs.clone(), config.tls.min_version)
        .map_err(LoadError::Tls)?;
    let routes = RouteTable::build(&config.routes, config.timeouts.upstream_response, registry);
    Ok(Snapshot {
        generation,
        config: Arc::new(config),
        routes: Arc::new(routes),
        certs,
        tls: server_config,
    })
}
