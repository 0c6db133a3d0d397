//! The price of post-quantum key exchange: CPU per full TLS 1.3 handshake on each side, with the
//! X25519MLKEM768 hybrid and with X25519, for an ECDSA P-256 and an RSA-2048 certificate.
//! `cargo bench --bench handshake` (release build). Prints one table; the figures go in
//! docs/performance.md.
//!
//! In memory, one thread: a rustls client and limen's own server config (`TlsShared`, the
//! provider and settings it serves with) pass records through buffers, and each side's time is
//! the time spent in its own calls, which is its CPU (nothing blocks). No sockets, no
//! resumption (tickets and the session cache are off on the client). Rounds alternate the two
//! groups so drift in the machine's speed falls on both alike; the median round is reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use limen::tls::{CertSource, CertStore, TlsShared};
use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
use rustls::crypto::SupportedKxGroup;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

const HANDSHAKES: u32 = 400;
const ROUNDS: usize = 5;

/// A CA and a leaf for `bench.test` with a key made by `alg`, as PEM.
fn pki(alg: &'static rcgen::SignatureAlgorithm) -> (String, String, String) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate_for(alg).unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let leaf_key = rcgen::KeyPair::generate_for(alg).unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["bench.test".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}

fn server(shared: &TlsShared, cert: &str, key: &str, post_quantum: bool) -> Arc<ServerConfig> {
    let src = CertSource {
        cert: "bench.crt".into(),
        key: "bench.key".into(),
    };
    let loaded =
        limen::tls::parse_pair(cert.as_bytes(), key.as_bytes(), &src, shared.provider()).unwrap();
    let store = Arc::new(CertStore::new(vec![Arc::new(loaded)]));
    shared
        .server_config(store, limen::config::TlsVersion::V12, post_quantum)
        .unwrap()
}

/// A client that offers only `group`, trusts `ca`, and never resumes.
fn client(ca: &str, group: &'static dyn SupportedKxGroup) -> Arc<ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![group],
        ..default_provider()
    };
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// Moves what `from` has to send into `to`; the time is `to`'s (reading and processing).
fn pass(from: &mut impl WriteTls, to: &mut impl ReadTls, spent: &mut Duration) -> bool {
    let mut buf = Vec::new();
    while from.wants() {
        from.write(&mut buf);
    }
    if buf.is_empty() {
        return false;
    }
    let t = Instant::now();
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read(&mut rd);
    }
    *spent += t.elapsed();
    true
}

trait WriteTls {
    fn wants(&self) -> bool;
    fn write(&mut self, out: &mut Vec<u8>);
}
trait ReadTls {
    fn read(&mut self, rd: &mut &[u8]);
}

macro_rules! tls_io {
    ($t:ty) => {
        impl WriteTls for $t {
            fn wants(&self) -> bool {
                self.wants_write()
            }
            fn write(&mut self, out: &mut Vec<u8>) {
                self.write_tls(out).unwrap();
            }
        }
        impl ReadTls for $t {
            fn read(&mut self, rd: &mut &[u8]) {
                self.read_tls(rd).unwrap();
                self.process_new_packets().unwrap();
            }
        }
    };
}
tls_io!(ClientConnection);
tls_io!(ServerConnection);

/// One full handshake: (server CPU, client CPU). Each side's writes are counted with the
/// reads that produced them, as rustls prepares its answer while processing.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> (Duration, Duration) {
    let (mut s_time, mut c_time) = (Duration::ZERO, Duration::ZERO);
    let t = Instant::now();
    let name = rustls::pki_types::ServerName::try_from("bench.test").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    c_time += t.elapsed();
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    s_time += t.elapsed();
    loop {
        let a = pass(&mut c, &mut s, &mut s_time);
        let b = pass(&mut s, &mut c, &mut c_time);
        if !a && !b {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    (s_time, c_time)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let shared = TlsShared::new().unwrap();
    println!("| certificate | key exchange | server µs / handshake | client µs / handshake |");
    println!("|---|---|---:|---:|");
    for (cert_name, alg) in [
        ("ECDSA P-256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("RSA-2048", &rcgen::PKCS_RSA_SHA256),
    ] {
        let (ca, cert, key) = pki(alg);
        let server = server(&shared, &cert, &key, true);
        let groups: [(&str, &'static dyn SupportedKxGroup); 2] = [
            ("X25519MLKEM768", kx_group::X25519MLKEM768),
            ("X25519", kx_group::X25519),
        ];
        let mut per_round: Vec<(Vec<Duration>, Vec<Duration>)> =
            vec![(Vec::new(), Vec::new()); groups.len()];
        for _ in 0..ROUNDS {
            for (i, (_, group)) in groups.iter().enumerate() {
                let client = client(&ca, *group);
                let (mut s, mut c) = (Duration::ZERO, Duration::ZERO);
                for _ in 0..HANDSHAKES {
                    let (ds, dc) = handshake(&server, &client);
                    s += ds;
                    c += dc;
                }
                per_round[i].0.push(s / HANDSHAKES);
                per_round[i].1.push(c / HANDSHAKES);
            }
        }
        for ((group, _), (s, c)) in groups.iter().zip(per_round) {
            println!(
                "| {cert_name} | {group} | {:.1} | {:.1} |",
                median(s).as_secs_f64() * 1e6,
                median(c).as_secs_f64() * 1e6
            );
        }
    }
}
