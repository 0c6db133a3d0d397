//! The `limen` binary: command line, logging, runtime, signals. Everything else is the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A TLS-terminating reverse proxy that picks up route and certificate changes by itself.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The YAML config file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// Load and validate the config and every certificate, print each problem, and exit (0: all
    /// good, 1: problems) without binding any port.
    #[arg(long)]
    check: bool,
    /// With --check: compare the checked config with the instance whose admin listener is at
    /// URL (http://HOST:PORT) and print what would change, one line each (exit 0; 1: the
    /// config has problems; 2: the instance cannot be reached or refuses the token).
    #[arg(long, value_name = "URL", requires = "check")]
    diff: Option<String>,
    /// The admin token for --diff, read from this file (else from LIMEN_ADMIN_TOKEN).
    #[arg(long, value_name = "FILE", requires = "diff")]
    admin_token_file: Option<PathBuf>,
    /// Log line format. The level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // rustls warns once per connection about things any client can send (an IP address as SNI),
    // which would let clients flood the log; its errors still show.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }

    if cli.check {
        return check(
            &cli.config,
            cli.diff.as_deref(),
            cli.admin_token_file.as_deref(),
        );
    }
    // Read the config once up front for the worker count; the server loads it again in full.
    let workers = match limen::config::Config::load(&cli.config) {
        Ok(c) => c.workers,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One worker: a current-thread runtime does the same work without the multi-thread
    // scheduler's cross-thread wake-ups and atomics (measured in docs/performance.md).
    let mut rt = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all();
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(
    path: &std::path::Path,
    diff: Option<&str>,
    token_file: Option<&std::path::Path>,
) -> ExitCode {
    let tls = match limen::tls::TlsShared::new() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot set up TLS: {e}");
            return ExitCode::FAILURE;
        }
    };
    let registry = limen::upstream::UpstreamRegistry::default();
    let mut reloader = limen::reload::Reloader::new(path);
    let snap = match reloader.initial_load(&tls, &registry) {
        Ok(snap) => snap,
        Err(e) => {
            for m in e.messages() {
                eprintln!("error: {m}");
            }
            return ExitCode::FAILURE;
        }
    };
    let ok = format!(
        "{}: OK ({} routes, {} certificates)",
        path.display(),
        snap.routes.routes().len(),
        snap.certs.certs().len()
    );
    let Some(url) = diff else {
        println!("{ok}");
        return ExitCode::SUCCESS;
    };
    // stdout carries the diff alone, for scripts and CI comments.
    eprintln!("{ok}");
    let token = match token_file {
        Some(f) => match std::fs::read(f) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: {}: cannot read the admin token: {e}", f.display());
                return ExitCode::from(2);
            }
        },
        None => std::env::var_os("LIMEN_ADMIN_TOKEN").map(|t| t.into_encoded_bytes()),
    };
    let fetched = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(limen::admin::fetch_status(
                url,
                token.as_deref(),
                std::time::Duration::from_secs(10),
            ))
            .map_err(|e| e.to_string())
        });
    let running = match fetched {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Secrets by fingerprint: the diff says one changed, never what it is.
    let mut candidate = limen::config::diff::View::from_config(&snap.config);
    snap.certs.add_to_view(&mut candidate);
    candidate.secrets = reloader.secret_fingerprints();
    let lines = limen::admin::diff_lines(&running, &candidate);
    if lines.is_empty() {
        println!("no changes");
    }
    for l in lines {
        println!("{l}");
    }
    ExitCode::SUCCESS
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let mut running = match limen::server::start(&path).await {
        Ok(r) => r,
        Err(limen::server::StartError::Load(e)) => {
            for m in e.messages() {
                eprintln!("error: {m}");
            }
            anyhow::bail!(
                "{} problem(s) in the configuration; nothing was started",
                e.messages().len()
            );
        }
        Err(e) => return Err(e.into()),
    };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    running.release_memory_with(malloc_trim);
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); break; }
            _ = int.recv() => { tracing::info!("SIGINT received"); break; }
            _ = hup.recv() => { tracing::info!("SIGHUP received: polling files now"); running.reload_now(); }
        }
    }
    running.shutdown().await;
    Ok(())
}

/// glibc gives memory back to the OS only from the top of a heap on its own; `malloc_trim`
/// also returns the free pages inside it, where a burst's per-connection buffers were
/// (docs/performance.md, "Memory given back"). The library forbids `unsafe`; this one foreign
/// call lives here, at the binary's edge.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_trim() {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: glibc's malloc_trim takes no pointer and locks each arena itself; it only
    // releases pages of chunks that are already free, so no live allocation is touched.
    unsafe {
        malloc_trim(0);
    }
}
