//! The server side of TLS: the SNI resolver over one `CertStore`, `TlsShared` (the crypto
//! provider, session-ticket producer and session cache every snapshot's configs share), and
//! `ServerTls`, a snapshot's rustls `ServerConfig`s: the default and one per `tls.client_auth`
//! policy (a webpki client verifier over the policy's CA roots, no resumption), chosen by SNI.
//!
//! Owns: ALPN and protocol versions offered to clients, ticketer and session cache wiring,
//! client-certificate policies, their CA bundles (`client_ca_roots`) and the refusal reasons
//! (`client_auth_refusal`). Must not touch: certificate files (`certs`), the name map's rules
//! (`store`), upstream connections (`upstream`), the published snapshot, sockets.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::{CertStore, TlsError};
use crate::config::TlsVersion;

/// Hands rustls the cert of one `CertStore` for each ClientHello.
#[derive(Debug)]
struct SniResolver {
    store: Arc<CertStore>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls lower-cases the SNI before we see it. None makes rustls abort the handshake
        // with a fatal alert; rustls chooses which (it does not let a resolver send unrecognized_name).
        self.store
            .select(hello.server_name())
            .map(|c| c.key.clone())
    }
}

/// Process-wide TLS state that must outlive any one snapshot, so that session resumption keeps
/// working across certificate reloads.
pub struct TlsShared {
    /// aws-lc-rs with X25519MLKEM768 first (rustls' `prefer-post-quantum`).
    provider: Arc<CryptoProvider>,
    /// The same without any ML-KEM group, for `post_quantum: false`.
    classic: Arc<CryptoProvider>,
    ticketer: Arc<crate::tickets::Ticketer>,
    sessions: Arc<dyn StoresServerSessions>,
}

impl fmt::Debug for TlsShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsShared")
    }
}

impl TlsShared {
    pub fn new() -> Result<TlsShared, rustls::Error> {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let mut classic = provider.clone();
        classic.kx_groups.retain(|g| !is_post_quantum(g.name()));
        Ok(TlsShared {
            provider: Arc::new(provider),
            classic: Arc::new(classic),
            ticketer: Arc::new(crate::tickets::Ticketer::new(
                rustls::crypto::aws_lc_rs::Ticketer::new()?,
            )),
            sessions: rustls::server::ServerSessionMemoryCache::new(16 * 1024),
        })
    }

    /// The ticketer of every config: `tls.ticket_keys` when loaded, else per process.
    pub fn ticketer(&self) -> &crate::tickets::Ticketer {
        &self.ticketer
    }

    /// The configs of one snapshot: the default, and one per `tls.client_auth` policy with its
    /// client-certificate verifier (`cas`: each policy's CA bundle, loaded). Policy configs
    /// never resume a session: rustls restores a resumed session's client certificate without
    /// verifying it again, so a ticket from before a policy, a CA rotation or the certificate's
    /// expiry would skip the check.
    pub fn server_tls(
        &self,
        store: Arc<CertStore>,
        settings: &crate::config::TlsSettings,
        cas: &std::collections::HashMap<PathBuf, Arc<rustls::RootCertStore>>,
    ) -> Result<Arc<ServerTls>, rustls::Error> {
        let default =
            self.server_config(store.clone(), settings.min_version, settings.post_quantum)?;
        let mut out = ServerTls {
            default,
            policies: Vec::new(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            any: None,
        };
        let versions = versions(settings.min_version);
        for spec in &settings.client_auth {
            let roots = cas.get(&spec.ca).cloned().ok_or_else(|| {
                rustls::Error::General(format!("{}: the CA bundle did not load", spec.ca.display()))
            })?;
            let roots_for_policy = roots.clone();
            let provider = self.provider_for(settings.post_quantum);
            let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots,
                provider.clone(),
            );
            let builder = match spec.mode {
                crate::config::ClientAuthMode::Require => builder,
                crate::config::ClientAuthMode::Optional => builder.allow_unauthenticated(),
            };
            let verifier = builder
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            let mut cfg = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)?
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(SniResolver {
                    store: store.clone(),
                }));
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            cfg.send_tls13_tickets = 0;
            let index = out.policies.len();
            for h in &spec.hosts {
                let label: Arc<str> = h.to_string().into();
                match h {
                    crate::config::HostPattern::Exact(n) => {
                        out.exact.insert(n.clone(), (index, label));
                    }
                    crate::config::HostPattern::Wildcard(p) => {
                        out.wildcard.insert(p.clone(), (index, label));
                    }
                    crate::config::HostPattern::Any => out.any = Some((index, label)),
                }
            }
            out.policies
                .push((spec.clone(), roots_for_policy, Arc::new(cfg)));
        }
        Ok(Arc::new(out))
    }

    /// A rustls config serving `store`. Cheap: called once per snapshot, never per handshake.
    pub fn server_config(
        &self,
        store: Arc<CertStore>,
        min: TlsVersion,
        post_quantum: bool,
    ) -> Result<Arc<ServerConfig>, rustls::Error> {
        let versions = versions(min);
        // aws-lc-rs' default suites are exactly ECDHE with AES-GCM or ChaCha20-Poly1305.
        let mut cfg = ServerConfig::builder_with_provider(self.provider_for(post_quantum))
            .with_protocol_versions(versions)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver { store }));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        cfg.ticketer = self.ticketer.clone();
        cfg.session_storage = self.sessions.clone();
        Ok(Arc::new(cfg))
    }

    pub fn provider(&self) -> &CryptoProvider {
        &self.provider
    }

    /// The provider for a `post_quantum` setting: the hybrid first, or no ML-KEM group at all.
    pub fn provider_for(&self, post_quantum: bool) -> Arc<CryptoProvider> {
        if post_quantum {
            self.provider.clone()
        } else {
            self.classic.clone()
        }
    }
}

/// Whether a key exchange group includes ML-KEM (alone or in a hybrid).
fn is_post_quantum(group: rustls::NamedGroup) -> bool {
    use rustls::NamedGroup as G;
    matches!(
        group,
        G::X25519MLKEM768 | G::secp256r1MLKEM768 | G::MLKEM512 | G::MLKEM768 | G::MLKEM1024
    )
}

/// The label of a negotiated key exchange group in `limen_tls_key_exchanges_total`.
pub fn group_label(group: Option<rustls::NamedGroup>) -> &'static str {
    use rustls::NamedGroup as G;
    match group {
        None => "none",
        Some(G::X25519MLKEM768) => "X25519MLKEM768",
        Some(G::X25519) => "X25519",
        Some(G::secp256r1) => "secp256r1",
        Some(G::secp384r1) => "secp384r1",
        Some(_) => "other",
    }
}

/// The protocol versions served from `tls.min_version` up.
fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match min {
        TlsVersion::V12 => &BOTH,
        TlsVersion::V13 => &TLS13,
    }
}

/// A snapshot's TLS configs: the default, and one per client-certificate policy, chosen by SNI
/// (exact name, then `*.parent`, then `*`; no SNI: `*` only).
pub struct ServerTls {
    pub default: Arc<ServerConfig>,
    /// Each policy, the CA roots its verifier trusts (their identity tells a connection verified
    /// under an older bundle), and its config.
    policies: Vec<(
        Arc<crate::config::ClientAuthSpec>,
        Arc<rustls::RootCertStore>,
        Arc<ServerConfig>,
    )>,
    exact: HashMap<String, (usize, Arc<str>)>,
    wildcard: HashMap<String, (usize, Arc<str>)>,
    any: Option<(usize, Arc<str>)>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerTls({} client-auth policies)", self.policies.len())
    }
}

/// The policy a handshake applied, and the host pattern that chose it (the metrics label).
#[derive(Debug, Clone)]
pub struct Applied {
    pub spec: Arc<crate::config::ClientAuthSpec>,
    /// The CA roots that verified the client (or would have).
    pub roots: Arc<rustls::RootCertStore>,
    pub host: Arc<str>,
}

impl ServerTls {
    /// A snapshot without client-certificate policies.
    pub fn plain(default: Arc<ServerConfig>) -> Arc<ServerTls> {
        Arc::new(ServerTls {
            default,
            policies: Vec::new(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            any: None,
        })
    }

    pub fn has_policies(&self) -> bool {
        !self.policies.is_empty()
    }

    fn find(&self, host: Option<&str>) -> Option<&(usize, Arc<str>)> {
        if let Some(h) = host {
            if let Some(p) = self.exact.get(h) {
                return Some(p);
            }
            if let Some((_, parent)) = h.split_once('.') {
                if let Some(p) = self.wildcard.get(parent) {
                    return Some(p);
                }
            }
        }
        self.any.as_ref()
    }

    /// The config for a ClientHello with this SNI, and the policy it applies.
    pub fn select(&self, sni: Option<&str>) -> (&Arc<ServerConfig>, Option<Applied>) {
        match self.find(sni) {
            Some((i, host)) => {
                let (spec, roots, cfg) = &self.policies[*i];
                (
                    cfg,
                    Some(Applied {
                        spec: spec.clone(),
                        roots: roots.clone(),
                        host: host.clone(),
                    }),
                )
            }
            None => (&self.default, None),
        }
    }

    /// The policy a request's host falls under, if any, with the roots it trusts now.
    pub fn policy_for_host(
        &self,
        host: &str,
    ) -> Option<(
        &Arc<crate::config::ClientAuthSpec>,
        &Arc<rustls::RootCertStore>,
    )> {
        if self.policies.is_empty() {
            return None;
        }
        self.find(Some(host)).map(|(i, _)| {
            let (spec, roots, _) = &self.policies[*i];
            (spec, roots)
        })
    }
}

/// Why a handshake refused a client certificate, as `limen_tls_client_auth_failures_total`'s
/// `reason`: the alert rustls sent decides (a not-yet-valid certificate is `expired`, as
/// rustls' alert says). None: the failure was not about the client's certificate.
pub fn client_auth_refusal(e: &std::io::Error) -> Option<&'static str> {
    use rustls::AlertDescription as A;
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::NoCertificatesPresented => Some("missing"),
        rustls::Error::InvalidCertificate(c) => Some(match A::from(c.clone()) {
            A::CertificateExpired => "expired",
            A::UnknownCA => "unknown_ca",
            _ => "invalid",
        }),
        _ => None,
    }
}

/// A client CA bundle's certificates.
pub fn client_ca_roots(pem: &[u8], path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    if ignored > 0 {
        // A bundle that silently lost a CA would refuse that CA's clients with no word why.
        return Err(TlsError::BadPem {
            path: path.to_path_buf(),
            reason: format!("{ignored} of its certificates cannot be used as a CA"),
        });
    }
    Ok(Arc::new(roots))
}
