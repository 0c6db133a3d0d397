//! The client side of TLS, to `https://` upstreams: the files of one `upstream_tls` block and
//! the rustls `ClientConfig` built from them (roots, client certificate, ALPN, or no
//! verification when `insecure_skip_verify` asks).
//!
//! Owns: reading `upstream_tls` files and turning them into a client config. Must not touch:
//! server configs or the certificate map (`server`, `store`), dialling or pools (`upstream`
//! module of the crate), the published snapshot, sockets.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::certs::{chain_and_key, read};
use super::{CertSource, TlsError};

/// The files of one `upstream_tls` block, as read: the CA bundle and the client pair.
#[derive(PartialEq, Eq)]
pub struct UpstreamTlsFiles {
    pub ca: Option<Vec<u8>>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// Reads the files `settings` names (each at most 1 MiB, regular files only).
pub fn read_upstream_tls(
    settings: &crate::config::UpstreamTls,
) -> Result<UpstreamTlsFiles, TlsError> {
    Ok(UpstreamTlsFiles {
        ca: settings.ca.as_deref().map(read).transpose()?,
        client: match &settings.client {
            Some((c, k)) => Some((read(c)?, read(k)?)),
            None => None,
        },
    })
}

/// Accepts any upstream certificate (`insecure_skip_verify: true`); handshake signatures are
/// still checked, so the connection is encrypted, only not authenticated.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls client config for one `upstream_tls` block: its roots (the CA bundle, else the
/// system's), its client certificate, and ALPN as `protocol` says. TLS 1.2 and 1.3, the one
/// crypto provider.
pub fn upstream_client_config(
    settings: &crate::config::UpstreamTls,
    files: &UpstreamTlsFiles,
    provider: &CryptoProvider,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(provider.clone());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Client {
            reason: e.to_string(),
        })?;
    let builder = if settings.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider.clone())))
    } else {
        builder.with_root_certificates(upstream_roots(settings, files)?)
    };
    let mut cfg = match (&files.client, &settings.client) {
        (Some((cert_pem, key_pem)), Some((cert, key))) => {
            let src = CertSource {
                cert: cert.clone(),
                key: key.clone(),
            };
            let (chain, key_der) = chain_and_key(cert_pem, key_pem, &src)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| TlsError::BadKey {
                    path: src.key.clone(),
                    reason: e.to_string(),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn(settings.protocol);
    if settings.insecure_skip_verify {
        tracing::warn!(
            ca = ?settings.ca,
            "upstream_tls.insecure_skip_verify is true: upstream certificates are not verified"
        );
    }
    Ok(Arc::new(cfg))
}

/// The roots upstream certificates are verified against: the block's CA bundle, else the
/// system's (a warning when the system has none).
fn upstream_roots(
    settings: &crate::config::UpstreamTls,
    files: &UpstreamTlsFiles,
) -> Result<rustls::RootCertStore, TlsError> {
    let ca_path = || settings.ca.clone().unwrap_or_default();
    let mut roots = rustls::RootCertStore::empty();
    match &files.ca {
        Some(pem) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::BadPem {
                    path: ca_path(),
                    reason: e.to_string(),
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::NoCertificate { path: ca_path() });
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            // A fact about the machine, not about this block: said once.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if added == 0 && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!("no system root certificates found: https:// upstreams without upstream_tls.ca cannot be verified");
            }
        }
    }
    Ok(roots)
}

/// The ALPN protocols offered to an upstream, as `upstream_tls.protocol` says.
fn alpn(protocol: crate::config::UpstreamProtocol) -> Vec<Vec<u8>> {
    use crate::config::UpstreamProtocol;
    match protocol {
        UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        UpstreamProtocol::H2 => vec![b"h2".to_vec()],
    }
}
