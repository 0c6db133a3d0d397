//! `tls.client_auth`: which hosts want a client certificate, from which CAs, how strictly, and
//! whether the verified certificate is forwarded (RFC 9440).
//!
//! Owns: the policies' syntax and rules (a host in one policy at most, DNS names only). Must not
//! touch: the CA bundles' contents (the reloader reads them), handshakes.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{ConfigError, HostPattern};

/// `require`: no valid certificate, no handshake. `optional`: verified when one is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ClientAuthMode {
    #[default]
    Require,
    Optional,
}

impl FromStr for ClientAuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "require" => Ok(ClientAuthMode::Require),
            "optional" => Ok(ClientAuthMode::Optional),
            _ => Err(format!(
                "mode {s:?}: use require (a client without a valid certificate fails the handshake) or optional (a certificate is verified when one is offered)"
            )),
        }
    }
}
deserialize_from_str!(ClientAuthMode);

/// One policy, as validated. Its value is its identity: a connection made under a policy serves
/// that policy's hosts while an equal policy is in force.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientAuthSpec {
    pub hosts: Vec<HostPattern>,
    /// PEM bundle of the CAs that issue client certificates.
    pub ca: PathBuf,
    pub mode: ClientAuthMode,
    /// Send `Client-Cert` / `Client-Cert-Chain` upstream.
    pub forward: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientAuth {
    hosts: Vec<HostPattern>,
    ca: PathBuf,
    #[serde(default)]
    mode: ClientAuthMode,
    #[serde(default)]
    forward: bool,
}

pub(super) fn client_auth_from(
    raw: Vec<Spanned<RawClientAuth>>,
    path: &std::path::Path,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<Vec<Arc<ClientAuthSpec>>, ConfigError> {
    let mut seen: std::collections::HashMap<HostPattern, (usize, u64, u64)> = Default::default();
    let mut out = Vec::with_capacity(raw.len());
    for (i, spanned) in raw.into_iter().enumerate() {
        let (line, column) = (spanned.referenced.line(), spanned.referenced.column());
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            message: format!("tls.client_auth[{i}]: {message}"),
        };
        let r = spanned.value;
        if r.hosts.is_empty() {
            return Err(invalid("hosts is empty; list the hosts whose clients must present a certificate, like [\"admin.example.test\", \"*.internal.example.test\"]".into()));
        }
        for h in &r.hosts {
            if let HostPattern::Exact(name) = h {
                if name.parse::<std::net::IpAddr>().is_ok() {
                    return Err(invalid(format!("host {name:?} is an IP address; policies are chosen by the TLS server name (SNI), which clients never send for an IP: name a DNS host")));
                }
            }
            if let Some((j, l, c)) = seen.insert(h.clone(), (i, line, column)) {
                return Err(invalid(format!("host \"{h}\" already has a policy (tls.client_auth[{j}], line {l}:{c}); a host has one client_auth policy: merge the two or drop one")));
            }
        }
        out.push(Arc::new(ClientAuthSpec {
            hosts: r.hosts,
            ca: resolve(r.ca),
            mode: r.mode,
            forward: r.forward,
        }));
    }
    Ok(out)
}
