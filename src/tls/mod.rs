//! Certificates for both sides of the proxy: finding them on disk, loading and checking them,
//! choosing one per handshake by SNI, and the client config for TLS to upstreams.
//!
//! The module is a folder, one concern a file:
//! - `certs`: cert/key pairs on disk (`discover`, `scan_dir`), PEM and X.509 parsing into a
//!   `LoadedCert` (`parse_pair`, `leaf_facts`), and the self-signed development certificate;
//! - `store`: `CertStore`, the name -> certificate map of one snapshot;
//! - `server`: the SNI resolver, `TlsShared` (provider, ticketer, session cache) and the
//!   `ServerTls` configs of one snapshot, with the `tls.client_auth` policies and their CA roots;
//! - `upstream`: the rustls client config for an `upstream_tls` block and the files it reads.
//!
//! This file owns `TlsError` and the public paths (`crate::tls::X`): everything the files define
//! for other modules is re-exported here. Must not touch: the published snapshot (the module
//! builds values; `reload` and `server` publish them), sockets.

use std::path::PathBuf;

mod certs;
mod server;
mod store;
mod upstream;

pub(crate) use certs::read;
pub use certs::{
    discover, hex, leaf_facts, name_matches, parse_pair, scan_dir, self_signed, CertSource,
    LoadedCert,
};
pub use server::{
    client_auth_refusal, client_ca_roots, group_label, Applied, ServerTls, TlsShared,
};
pub use store::{uncovered_route_hosts, CertStore};
pub use upstream::{read_upstream_tls, upstream_client_config, UpstreamTlsFiles};

/// A certificate problem. `Display` names the file(s), what is wrong and what to do.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TlsError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: no PEM certificate found (expected \"-----BEGIN CERTIFICATE-----\"); is the file complete?")]
    NoCertificate { path: PathBuf },
    #[error("{path}: malformed PEM: {reason}; is the file complete?")]
    BadPem { path: PathBuf, reason: String },
    #[error("{path}: no private key found (expected a PKCS#8, PKCS#1 or SEC1 PEM key)")]
    NoKey { path: PathBuf },
    #[error("{path}: the private key is encrypted; limen needs it unencrypted (decrypt it with `openssl pkey -in KEY -out KEY.plain`, and keep the file mode 0400)")]
    EncryptedKey { path: PathBuf },
    #[error("{path}: the private key cannot be used: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{key} does not belong to {cert}: the key's public half differs from the certificate's; install the key issued with this certificate")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: the certificate cannot be parsed as X.509: {reason}")]
    BadX509 { path: PathBuf, reason: String },
    #[error("{path}: the certificate names no DNS host (no subjectAltName DNS entry and no common name)")]
    NoNames { path: PathBuf },
    #[error("{path}: cannot list the certificate directory: {reason}")]
    Dir { path: PathBuf, reason: String },
    #[error("tls.default_cert {name:?} is not covered by any loaded certificate; name a host one of them serves")]
    NoDefault { name: String },
    #[error("no certificate covers route host {host:?}; add a certificate for it or set tls.self_signed: true for development")]
    Uncovered { host: String },
    #[error("cannot set up TLS to upstreams: {reason}")]
    Client { reason: String },
    #[error("cannot generate the self-signed development certificate: {reason}")]
    SelfSigned { reason: String },
}
