//! A change on disk applies whole or changes nothing. An operator edits the config to rotate every
//! secret at once (the admin token file, the session-ticket keys, the client CA bundle of an mTLS
//! host, the CA bundle an https upstream is verified with, the client certificate limen shows an
//! upstream that requires one), and the same edit is refused for another reason: a listener that
//! cannot bind, a `default_cert` no certificate covers, a route a routes_dir file already holds,
//! an upstream TLS file that does not load. Through several polls after each refused edit, every
//! old secret stays in force at every sample and no new one is ever seen; then the same rotation
//! in an edit that passes applies all of them.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::*;
use http::StatusCode;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const HOST: &str = "app.example.test";
const MTLS: &str = "mtls.example.test";

/// Secret files written with the modes limen asks for.
fn write_secret(path: &std::path::Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    set_mode(&tmp, 0o600);
    std::fs::rename(&tmp, path).unwrap();
}

fn ticket_key(seed: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([seed; 80])
}

/// Which generation of secrets a config names, and what else it says.
struct Edit<'a> {
    /// 1: the secrets in force at start; 2: the rotated ones.
    secrets: u8,
    /// Extra keys under `listen:`.
    listen: &'a str,
    /// Extra keys under `tls:`.
    tls: &'a str,
    /// Extra routes of the main file.
    routes: &'a str,
}

fn config((upstream, guarded): (&str, &str), e: &Edit<'_>) -> String {
    let n = e.secrets;
    format!(
        concat!(
            "listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n",
            "  admin_token_file: ./token-{n}\n{listen}",
            "tls:\n  cert_dirs: [\"./certs\"]\n  ticket_keys: ./tickets-{n}\n",
            "  client_auth:\n    - {{hosts: [\"{mtls}\"], ca: ./client-ca-{n}.pem}}\n{tls}",
            "reload:\n  interval: 50ms\nroutes_dir: ./routes.d\nroutes:\n",
            "  - {{host: \"{mtls}\", respond: {{body: mtls}}}}\n",
            "  - {{host: \"{host}\", respond: {{}}}}\n",
            "  - host: \"{host}\"\n    path: /up\n    upstreams: [\"{upstream}\"]\n",
            "    upstream_tls: {{ca: ./up-ca-{n}.pem, server_name: api.internal}}\n",
            "  - host: \"{host}\"\n    path: /up-client\n    upstreams: [\"{guarded}\"]\n",
            "    upstream_tls: {{ca: ./up-ca-1.pem, server_name: api.internal, ",
            "client_cert: ./up-client-{n}.crt, client_key: ./up-client-{n}.key}}\n{routes}",
        ),
        n = n,
        mtls = MTLS,
        host = HOST,
        upstream = upstream,
        guarded = guarded,
        listen = e.listen,
        tls = e.tls,
        routes = e.routes,
    )
}

/// A client for the mTLS host with `identity` as its certificate.
fn mtls_client(server_ca: &Pki, identity: &Issued) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.ca_der.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Whether a GET to the mTLS host with this client certificate is answered 200.
async fn mtls_ok(cfg: &Arc<rustls::ClientConfig>, addr: SocketAddr) -> bool {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let Ok(tls) = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from(MTLS).unwrap(), tcp)
        .await
    else {
        return false;
    };
    let Ok((mut send, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", MTLS)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    // Under TLS 1.3 a refused certificate shows at the first read, as the alert.
    matches!(
        tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await,
        Ok(Ok(r)) if r.status() == StatusCode::OK
    )
}

/// Everything a sample looks at.
struct World {
    pki: Pki,
    client: Client,
    proxy: Proxy,
    /// A replica that keeps ticket key 1 for good: its tickets resume on the proxy exactly while
    /// the proxy has key 1.
    replica: Proxy,
    tickets: Arc<rustls::ClientConfig>,
    identity: [Arc<rustls::ClientConfig>; 2],
}

/// What one sample saw of each secret: true where generation-1's is the one in force.
#[derive(Debug, PartialEq)]
struct Seen {
    old_token: StatusCode,
    new_token: StatusCode,
    old_ticket_key_resumes: bool,
    old_client_ca: bool,
    new_client_ca: bool,
    upstream_verified_by_old_ca: StatusCode,
    upstream_accepts_old_client_cert: StatusCode,
}

const OLD: Seen = Seen {
    old_token: StatusCode::OK,
    new_token: StatusCode::UNAUTHORIZED,
    old_ticket_key_resumes: true,
    old_client_ca: true,
    new_client_ca: false,
    upstream_verified_by_old_ca: StatusCode::OK,
    upstream_accepts_old_client_cert: StatusCode::OK,
};

const NEW: Seen = Seen {
    old_token: StatusCode::UNAUTHORIZED,
    new_token: StatusCode::OK,
    old_ticket_key_resumes: false,
    old_client_ca: false,
    new_client_ca: true,
    upstream_verified_by_old_ca: StatusCode::BAD_GATEWAY,
    upstream_accepts_old_client_cert: StatusCode::BAD_GATEWAY,
};

impl World {
    async fn sample(&self) -> Seen {
        let admin = self.proxy.admin();
        let token = |t: &'static str| async move {
            let auth = format!("Bearer {t}");
            StatusCode::from_u16(admin_get_with(admin, "/status.json", Some(&auth)).await.0)
                .unwrap()
        };
        // A fresh ticket from the replica (key 1), then the proxy: resumed only with key 1.
        resumes(&self.tickets, HOST, self.replica.addr).await;
        Seen {
            old_token: token("token-one").await,
            new_token: token("token-two").await,
            old_ticket_key_resumes: resumes(&self.tickets, HOST, self.proxy.addr).await,
            old_client_ca: mtls_ok(&self.identity[0], self.proxy.addr).await,
            new_client_ca: mtls_ok(&self.identity[1], self.proxy.addr).await,
            upstream_verified_by_old_ca: self.client.get(self.proxy.addr, HOST, "/up").await.status,
            upstream_accepts_old_client_cert: self
                .client
                .get(self.proxy.addr, HOST, "/up-client")
                .await
                .status,
        }
    }

    async fn metrics(&self) -> String {
        admin_get_with(self.proxy.admin(), "/metrics", Some("Bearer token-one"))
            .await
            .2
    }
}

/// Successful secret reloads counted so far: a refused edit must not move them.
fn installs(metrics: &str) -> Vec<Option<f64>> {
    ["admin_token", "ticket_keys", "client_ca"]
        .iter()
        .map(|k| {
            metric(
                metrics,
                &format!("limen_reloads_total{{kind=\"{k}\",result=\"success\"}}"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_edit_installs_none_of_its_secrets_and_an_accepted_one_installs_them_all() {
    let pki = Pki::new();
    let client_cas = [Pki::named("client CA one"), Pki::named("client CA two")];
    let upstream_cas = [Pki::named("upstream CA one"), Pki::named("upstream CA two")];
    let backend = TlsBackend::start(&upstream_cas[0], &["api.internal"], &["http/1.1"], None).await;
    // An upstream that requires a client certificate from "upstream clients one".
    let upstream_clients = [
        Pki::named("upstream clients one"),
        Pki::named("upstream clients two"),
    ];
    let guarded = TlsBackend::start(
        &upstream_cas[0],
        &["api.internal"],
        &["http/1.1"],
        Some(&upstream_clients[0]),
    )
    .await;

    let dir = Proxy::dir();
    pki.issue(&[HOST, MTLS])
        .write(&dir.path().join("certs"), "site");
    let at = |name: &str| dir.path().join(name);
    for n in [1u8, 2] {
        let i = usize::from(n - 1);
        write_secret(&at(&format!("token-{n}")), ["token-one", "token-two"][i]);
        write_secret(&at(&format!("tickets-{n}")), &ticket_key(n));
        write_secret(&at(&format!("client-ca-{n}.pem")), &client_cas[i].ca_pem);
        write_secret(&at(&format!("up-ca-{n}.pem")), &upstream_cas[i].ca_pem);
        let pair = upstream_clients[i].issue(&["limen.client"]);
        write_secret(&at(&format!("up-client-{n}.crt")), &pair.cert_pem);
        write_secret(&at(&format!("up-client-{n}.key")), &pair.key_pem);
    }
    std::fs::create_dir(at("routes.d")).unwrap();
    std::fs::write(
        at("routes.d/team.yaml"),
        format!("routes:\n  - {{host: \"{HOST}\", path: /owned, respond: {{body: team}}}}\n"),
    )
    .unwrap();
    let urls = (backend.url(), guarded.url());
    let upstream = (urls.0.as_str(), urls.1.as_str());
    let plain = Edit {
        secrets: 1,
        listen: "",
        tls: "",
        routes: "",
    };
    let proxy = Proxy::start_in(dir, &config(upstream, &plain)).await;

    let replica_dir = Proxy::dir();
    pki.issue(&[HOST])
        .write(&replica_dir.path().join("certs"), "site");
    write_secret(&replica_dir.path().join("tickets"), &ticket_key(1));
    let replica = Proxy::start_in(
        replica_dir,
        &config_yaml(
            "  ticket_keys: ./tickets\n",
            &format!("  - {{host: \"{HOST}\", respond: {{}}}}\n"),
        ),
    )
    .await;

    let client = Client::new(&pki);
    let world = World {
        tickets: client.config_with(&[&rustls::version::TLS13]),
        identity: [
            mtls_client(&pki, &client_cas[0].issue(&["client one"])),
            mtls_client(&pki, &client_cas[1].issue(&["client two"])),
        ],
        client,
        pki,
        proxy,
        replica,
    };
    assert_eq!(world.sample().await, OLD, "at start");
    let _ = &world.pki;

    // A port some other process holds: listen.http cannot bind there.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_listen = format!("  http: \"{}\"\n", taken.local_addr().unwrap());
    let refusals: [(&str, Edit<'_>); 4] = [
        (
            "a listener that cannot bind",
            Edit {
                secrets: 2,
                listen: &taken_listen,
                tls: "",
                routes: "",
            },
        ),
        (
            "a default_cert no certificate covers",
            Edit {
                secrets: 2,
                listen: "",
                tls: "  default_cert: nobody.example.test\n",
                routes: "",
            },
        ),
        (
            "a route a routes_dir file holds",
            Edit {
                secrets: 2,
                listen: "",
                tls: "",
                routes: &format!("  - {{host: \"{HOST}\", path: /owned, respond: {{}}}}\n"),
            },
        ),
        (
            "an upstream TLS file that does not load",
            Edit {
                secrets: 2,
                listen: "",
                tls: "",
                routes: "  - host: \"*\"\n    upstreams: [\"https://127.0.0.1:9\"]\n    upstream_tls: {ca: ./missing-ca.pem}\n",
            },
        ),
    ];
    for (why, edit) in &refusals {
        let generation = world.proxy.generation();
        let failures = world.proxy.status().config.failures;
        let installed = installs(&world.metrics().await);
        write_atomic(&world.proxy.config_path, &config(upstream, edit));
        eventually(Duration::from_secs(5), why, || async {
            world.proxy.status().config.failures > failures
        })
        .await;
        // Several polls of the refused file, every one of them sampled.
        let polls = world.proxy.status().polls;
        let mut samples = 0;
        while world.proxy.status().polls < polls + 6 || samples < 3 {
            assert_eq!(world.sample().await, OLD, "after the refused edit ({why})");
            samples += 1;
        }
        assert_eq!(
            world.proxy.generation(),
            generation,
            "{why}: nothing published"
        );
        assert_eq!(
            installs(&world.metrics().await),
            installed,
            "{why}: no secret counted as installed"
        );
        assert_eq!(
            world.proxy.status().config.failures,
            failures + 1,
            "{why}: reported once"
        );
        // Back to the config in force before the next refusal.
        write_atomic(&world.proxy.config_path, &config(upstream, &plain));
        eventually(
            Duration::from_secs(5),
            "the file is valid again",
            || async { world.proxy.status().config.errors.is_empty() },
        )
        .await;
    }

    // The same rotation without a reason to refuse it: every secret follows the config.
    let rotated = Edit {
        secrets: 2,
        listen: "",
        tls: "",
        routes: "",
    };
    world
        .proxy
        .reconfigure(&config(upstream, &rotated), Duration::from_secs(5))
        .await;
    eventually(
        Duration::from_secs(5),
        "every new secret is in force",
        || async { world.sample().await == NEW },
    )
    .await;
    drop(taken);
}

/// A config that asks for an admin token limen cannot load is refused whole: the admin API is
/// never left open by a reload (at start the same config does not start). Removing the key turns
/// the guard off, as the config then says.
#[tokio::test]
async fn an_admin_token_the_reload_cannot_load_refuses_the_config_and_removing_the_key_removes_the_guard(
) {
    let dir = Proxy::dir();
    let yaml = |listen_extra: &str, body: &str| {
        format!("listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n{listen_extra}tls:\n  self_signed: true\nreload:\n  interval: 50ms\nroutes:\n  - {{host: \"*\", respond: {{body: {body}}}}}\n")
    };
    let proxy = Proxy::start_in(dir, &yaml("", "open")).await;
    let admin = proxy.admin();
    assert_eq!(admin_get(admin, "/status.json").await.0, 200);

    // World-readable, then missing: each refused, the admin API and the routes as they were.
    let token = proxy.path("token");
    std::fs::write(&token, "s3cret").unwrap();
    set_mode(&token, 0o644);
    for (why, body) in [("world-readable", "one"), ("missing", "two")] {
        if why == "missing" {
            std::fs::remove_file(&token).unwrap();
        }
        let failures = proxy.status().config.failures;
        write_atomic(
            &proxy.config_path,
            &yaml("  admin_token_file: ./token\n", body),
        );
        eventually(Duration::from_secs(5), why, || async {
            proxy.status().config.failures > failures
        })
        .await;
        let errors = proxy.status().config.errors.join("\n");
        assert!(errors.contains("admin_token_file"), "{why}: {errors}");
        assert_eq!(
            admin_get(admin, "/status.json").await.0,
            200,
            "{why}: the guard was never half-installed"
        );
        let got = proxy.generation();
        assert_eq!(
            got, 1,
            "{why}: the routes of the refused file are not served"
        );
    }

    // Fixed: the guard and the routes come together.
    write_secret(&token, "s3cret");
    eventually(Duration::from_secs(5), "the guard is on", || async {
        admin_get(admin, "/status.json").await.0 == 401
    })
    .await;
    assert_eq!(
        admin_get_with(admin, "/status.json", Some("Bearer s3cret"))
            .await
            .0,
        200
    );

    // The key removed: the config says no token, so none is asked for.
    proxy
        .reconfigure(&yaml("", "open-again"), Duration::from_secs(5))
        .await;
    assert_eq!(admin_get(admin, "/status.json").await.0, 200);
}

/// The class around the admin token: every secret a reload can add is gated the same way. A
/// config edit that names a ticket-key file, a client-CA bundle or an upstream CA that does not
/// load is refused whole (nothing of it is served, the generation stays); the same edit applies
/// once the file is there.
#[tokio::test]
async fn every_secret_a_reload_adds_is_refused_whole_while_its_file_does_not_load() {
    let dir = Proxy::dir();
    let pki = Pki::new();
    let base = |tls_extra: &str, route_extra: &str, body: &str| {
        format!("listen:\n  https: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\ntls:\n  self_signed: true\n{tls_extra}reload:\n  interval: 50ms\nroutes:\n  - {{host: \"*\", respond: {{body: {body}}}}}\n{route_extra}")
    };
    let proxy = Proxy::start_in(dir, &base("", "", "start")).await;
    let cases: [(&str, &str, &str, &str, String); 3] = [
        (
            "ticket_keys",
            "  ticket_keys: ./tickets.key\n",
            "",
            "tickets.key",
            format!("{}\n", ticket_key(7)),
        ),
        (
            "client_auth",
            "  client_auth:\n    - {hosts: [\"mtls.test\"], ca: ./clients.pem}\n",
            "",
            "clients.pem",
            pki.ca_pem.clone(),
        ),
        (
            "upstream_tls",
            "",
            "  - {host: \"api.test\", upstreams: [\"https://127.0.0.1:1\"], upstream_tls: {ca: ./upstream-ca.pem}}\n",
            "upstream-ca.pem",
            pki.ca_pem.clone(),
        ),
    ];
    for (what, tls_extra, route_extra, file, contents) in cases {
        let generation = proxy.generation();
        let failures = proxy.status().config.failures;
        let body = format!("with-{what}");
        write_atomic(&proxy.config_path, &base(tls_extra, route_extra, &body));
        eventually(Duration::from_secs(5), what, || async {
            proxy.status().config.failures > failures
        })
        .await;
        let errors = proxy.status().config.errors.join("\n");
        assert!(
            errors.contains(file),
            "{what}: the error names {file}: {errors}"
        );
        assert_eq!(
            proxy.generation(),
            generation,
            "{what}: nothing of the refused edit is served"
        );
        // The file comes: the very same edit applies whole.
        write_secret(&proxy.path(file), &contents);
        eventually(Duration::from_secs(5), "the edit applies", || async {
            proxy.generation() > generation
        })
        .await;
        // Back to the plain config for the next case.
        proxy
            .reconfigure(&base("", "", "start"), Duration::from_secs(5))
            .await;
    }
}
