//! A certificate verifier for the benchmark's load generators (`#[path]`-included by each).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts any certificate: the benchmark's is self-signed and reached by IP address. Handshake
/// signatures are still checked, since skipping that would spare the client work a real one does.
#[derive(Debug)]
pub struct AcceptAnyCert(pub WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A TLS 1.3 client config of `provider` that accepts any server certificate (checking handshake
/// signatures), offers `alpn`, and resumes sessions only with `resume`. (bench_openloop, which
/// also speaks TLS 1.2, builds its own.)
#[allow(dead_code)]
pub fn client_config(
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
    alpn: &[u8],
    resume: bool,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let verifier = AcceptAnyCert(provider.signature_verification_algorithms);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    if !resume {
        tls.resumption = rustls::client::Resumption::disabled();
    }
    Ok(tls)
}
