//! An HTTP/3 client for the tests: quinn + h3, trusting the test CA.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes};

/// One QUIC connection with HTTP/3 on it.
pub struct H3Conn {
    pub send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    pub quic: quinn::Connection,
    _endpoint: quinn::Endpoint,
    _driver: tokio::task::JoinHandle<()>,
}

/// What an HTTP/3 exchange brought back.
#[derive(Debug)]
pub struct H3Got {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl H3Got {
    pub fn echo(&self) -> super::Echo {
        serde_json::from_slice(&self.body).unwrap()
    }
}

pub fn h3_client_config(ca: &rustls_pki_types::CertificateDer<'static>) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}

impl H3Conn {
    /// Connects to `addr` with `sni`, trusting the test CA.
    pub async fn open(pki: &super::Pki, addr: SocketAddr, sni: &str) -> Result<H3Conn, String> {
        let mut endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
        endpoint.set_default_client_config(h3_client_config(&pki.ca_der));
        let quic = endpoint
            .connect(addr, sni)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic.clone()))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(H3Conn {
            send,
            quic,
            _endpoint: endpoint,
            _driver: driver,
        })
    }

    /// One request with `body` (sent whole), read back whole.
    pub async fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        fields: &[(&str, &str)],
        body: Bytes,
    ) -> Result<H3Got, String> {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("https://{host}{path}"));
        for (k, v) in fields {
            b = b.header(*k, *v);
        }
        let req = b.body(()).unwrap();
        let mut stream = self
            .send
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        // Sent in pieces, as a client streams a large upload.
        let mut rest = body;
        while !rest.is_empty() {
            let piece = rest.split_to(rest.len().min(64 * 1024));
            stream.send_data(piece).await.map_err(|e| e.to_string())?;
        }
        stream.finish().await.map_err(|e| e.to_string())?;
        let resp = stream.recv_response().await.map_err(|e| e.to_string())?;
        let mut out = bytes::BytesMut::new();
        while let Some(mut chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
            let n = chunk.remaining();
            out.extend_from_slice(&chunk.copy_to_bytes(n));
        }
        let trailers = stream.recv_trailers().await.map_err(|e| e.to_string())?;
        Ok(H3Got {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: out.freeze(),
            trailers,
        })
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<H3Got, String> {
        self.request("GET", host, path, &[], Bytes::new()).await
    }

    /// The certificate the server presented, DER.
    pub fn peer_cert(&self) -> Vec<u8> {
        self.quic
            .peer_identity()
            .and_then(|i| {
                i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|certs| certs.first().map(|c| c.to_vec()))
            .unwrap_or_default()
    }
}

/// A proxy serving `app.example.test` and `admin.example.test` (one certificate) over TLS and
/// QUIC, every host routed to `upstream`, with `admin.example.test` under a `tls.client_auth`
/// policy of `mode` (clients of another CA than `pki`'s).
pub async fn client_auth_proxy(pki: &super::Pki, upstream: &str, mode: &str) -> super::Proxy {
    let clients = super::Pki::named("clients CA");
    let dir = super::Proxy::dir();
    pki.issue(&["app.example.test", "admin.example.test"])
        .write(&dir.path().join("certs"), "site");
    std::fs::write(dir.path().join("clients-ca.pem"), &clients.ca_pem).unwrap();
    let yaml = format!(
        "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  quic: \"127.0.0.1:0\"\ntls:\n  cert_dirs: [\"./certs\"]\n  client_auth:\n    - {{hosts: [\"admin.example.test\"], ca: ./clients-ca.pem, mode: {mode}}}\nroutes:\n  - {{host: \"*\", upstreams: [\"{upstream}\"]}}\n"
    );
    super::Proxy::start_in(dir, &yaml).await
}
