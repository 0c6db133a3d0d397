#!/usr/bin/env bash
# Side-by-side benchmark: limen against nginx (and optionally HAProxy and h2o), one worker each, on
# 127.0.0.1, in interleaved rounds. See `bench/run.sh --help` and docs/performance.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/run.sh [options]

Runs limen and nginx side by side on 127.0.0.1, configured alike (same ECDSA P-256 cert, TLS 1.3,
one worker thread/process each, access logs off, keep-alive pooled HTTP/1.1 upstream: the repo's
one-thread examples/bench_upstream answering `200 hello`), in interleaved rounds (the order of the
proxies alternates from round to round), and prints one Markdown table: the median and the
min–max over rounds of every figure, and its ratio to nginx.

Each round, for each proxy:
  HTTP/1.1 keep-alive   wrk -t1 -c64 -dD --latency               req/s, p50, p99, CPU/request
  HTTP/1.1 open loop    examples/bench_openloop --rate X --duration D --connections 64
                                                                  p50, p99, req/s achieved
                        at a fixed rate X (after a 1 s warm-up at X), latency counted from when
                        each request was due (no coordinated omission, as wrk2), twice: X = 50 %
                        and 90 % of limen's saturation rate, which is limen's req/s in the
                        HTTP/1.1 keep-alive run of the same round (those runs go first, the
                        open-loop ones after them, within the round), so that every proxy is
                        sent the same rates and each round has its own; a proxy that cannot keep
                        up at X shows it in req/s achieved and is warned about
  HTTP/2                h2load -c16 -m16 -DD                      req/s, CPU/request
  HTTP/2 -> h2c upstream
                        h2load -c16 -m16 -DD on /h2c/             req/s, CPU/request
                        forwarded over HTTP/2 cleartext (prior knowledge): limen `h2c://`, nginx
                        `grpc_pass grpc://` (its only HTTP/2 client; a plain GET goes through; one
                        request per upstream connection, so 256 are kept alive), HAProxy `proto h2`
  HTTP/1.1 -> TLS upstream
                        wrk -t1 -c64 -dD --latency on /tls/      req/s, p50, p99, CPU/request
                        forwarded as HTTP/1.1 over TLS, keep-alive pooled, the upstream's cert
                        verified (trusted as its own CA; name bench.test, also sent as SNI): limen
                        `https://` with `upstream_tls` and `upstream_protocol: http1`, nginx
                        `proxy_pass https://` with `proxy_ssl_verify on`, HAProxy `ssl verify
                        required` with `sni` and `verifyhost`
  full TLS handshakes   h2load --h1 -c32 -nN -H 'Connection: close', with session resumption
                        disabled in the client (bench/no_resume.c, preloaded) and checked in a
                        packet capture: no ClientHello may offer a TLS 1.3 pre_shared_key
  resumed handshakes    the same with resumption on (h2load's default); share resumed, from the
                        capture (ServerHellos that accept a PSK)
  memory                RSS at start, after the load runs, peak (VmHWM); then, on fresh
                        processes, RSS delta / K for K idle TLS connections (bench/idle_tls.py),
                        once after the handshake alone and once after one request on each
Proxy CPU is utime+stime of the proxy's processes (/proc/PID/stat, nginx: master + worker) before
and after each run, divided by the requests (handshakes) the run completed.
The upstream of the h2c rows is bench_upstream's second listener (HTTP/2 cleartext, prior
knowledge, on P+5, the same thread, as fast as its HTTP/1.1 one). The upstream of the TLS-upstream
rows is one more nginx (one worker, access log off, `return 200 "hello"`; its CPU is not counted),
listening for TLS with HTTP/1.1 only on P+6, with an ECDSA P-256 end-entity cert of its own for
bench.test, which the proxies trust as their CA bundle. h2o is left out of both rows: Debian's h2o 2.2 cannot
speak HTTP/2 to an upstream, and verifies an upstream's cert only against the URL's host (no
setting for the name, IP addresses never match), which would need bench.test in /etc/hosts or
verification off. As in the other rows, a response that is not a 2xx is warned about and counted
in the errors row; besides, each proxy must answer `200 hello` on /h2c/ and /tls/ when it starts,
or the run stops.

Options:
  --quick            1 round, 3 s runs, 2,000 handshakes, 1,000 idle connections (smoke test)
  --rounds N         rounds (default 3)
  --duration S       seconds per wrk/h2load timed run (default 10)
  --handshakes N     connections per handshake run (default 10000)
  --idle-conns K     idle TLS connections for the memory figure (default 5000)
  --peers            also run HAProxy and h2o (installed from apt if missing; skipped if that fails)
  --out DIR          results directory (default target/bench-results/YYYYmmdd-HHMMSS)
  --port-base P      ports P (upstream), P+1 limen, P+2 nginx, P+3 haproxy, P+4 h2o, P+5 the h2c
                     upstream, P+6 the TLS upstream, P+7 Caddy (default 19400)
  --no-install       do not apt-get install missing tools; fail instead
  --no-build         do not run `cargo build --release` for limen, examples/bench_upstream and
                     examples/bench_openloop
  --keep-pcaps       keep the handshake runs' packet captures (TLS hellos only, ~10 MB each)
  --limen-bin PATH   the limen binary to measure (default target/release/limen; with
                     --no-build, to compare two builds against the same peers run after run)
  --guards           also the guard rows (limen and nginx only): HTTP/1.1 keep-alive
                     (wrk -t1 -c64) on a route with each of a route's guards on, against the same
                     route without: /g/none/; /g/access/ (1,000 allowed CIDR blocks, the client's
                     last; nginx: 1,000 `allow` lines, then `deny all`); /g/rate/ (a rate limit
                     never reached; nginx `limit_req` with nodelay); /g/basic/ (basic auth, one
                     bcrypt user at cost 10, the same credential on every request; nginx
                     `auth_basic`, which has no cache); /g/forward/ (forward auth to the
                     upstream, which answers 200; nginx `auth_request`)
  --guards-only      only the guard rows
  --actions          also the routing-action rows (limen and nginx; Caddy, installed from apt if
                     missing, in the compression rows): HTTP/1.1 keep-alive (wrk -t1 -c64) on
                     /a/none/ (a plain route); /m/svc250/x with `x-canary: true` among 1,000 routes
                     of one host, 500 paths each with a header-matched canary (nginx: 500
                     locations proxying to a `map` of the header); /r/users/42, a regex rewrite to
                     /users?id=42 (nginx: `rewrite ... break`); and 64 KiB of JSON from the
                     upstream at /c/none/json (not compressed), /c/gzip/json, /c/br/json and
                     /c/zstd/json with that Accept-Encoding (nginx: gzip only, level 5, as limen;
                     Caddy: `encode` gzip 5 and zstd). CPU per MiB of a coding = (CPU per request
                     with it - CPU per request at /c/none/) x 16
  --actions-only     only the routing-action rows
  --h3               also the HTTP/3 rows: examples/bench_h3 (closed loop, 16 QUIC connections x 16
                     requests in flight, like h2load -c16 -m16) to limen's listen.quic and to Caddy's
                     HTTP/3 (installed from apt if missing); beside the HTTP/2 row of the same round;
                     also full QUIC handshakes (+1 request, no resumption) and memory per idle QUIC
                     connection (at most 1,000)
  --h3-only          only the HTTP/2, full-handshake and HTTP/3 rows
  --profile          also, after each round's rows, one more run of HTTP/1.1, HTTP/2 and HTTP/2 ->
                     h2c per proxy with `perf stat` attached (its CPU not used: the probes cost some):
                     per request, the proxy's system calls (raw_syscalls:sys_enter), context
                     switches (each a wakeup after a wait) and glibc malloc calls (a uprobe on
                     libc's malloc; HAProxy's and nginx's own pools allocate without it), and in
                     the first round a CPU profile of each proxy's HTTP/2 -> h2c run (`perf record
                     -g`, call graphs by frame pointers; `perf report` text in the results)
  --h2-only          only the HTTP/1.1, HTTP/2 and HTTP/2 -> h2c rows (with --profile: and theirs)
  --pin              the proxy under test on CPU 1, everything else (load generators, upstreams) on
                     CPU 0 (taskset): on a 2-core machine this brings the CPU-per-request spread
                     from about ±15 % to ±2 %
  --pq               also full handshakes priced by key exchange, with a rustls client
                     (examples/bench_handshakes: no resumption, one GET each, 32 at a time, as many
                     as --handshakes): X25519 on every proxy, X25519MLKEM768 on limen (Debian's
                     OpenSSL 3.0 in the peers has no ML-KEM); CPU per handshake
  --floor            also examples/h2_floor ("floor"), the least a proxy on limen's libraries can
                     spend: rustls and hyper's server, hyper's client to the same upstreams (a
                     keep-alive pool for HTTP/1.1, one multiplexed h2c connection), nothing else;
                     in the rows with the plain and h2c upstreams, not the TLS-upstream ones
  -h, --help         this text

Needs: target/release/limen, target/release/examples/bench_upstream and
target/release/examples/bench_openloop (built unless --no-build),
and nginx, wrk, h2load (nghttp2-client), tcpdump, openssl, curl, python3 and a C compiler;
missing ones are installed with apt-get when running as root (note that installing nginx or h2o
from Debian packages may start their system services on ports 80/443).
Everything it starts is bounded in time and stopped on exit. Raw outputs, configs and logs are
kept in the results directory; the table is also written there as summary.md.
EOF
}

# ------------------------------------------------------------------------------------------------
# options

ROUNDS=3
DURATION=10
HANDSHAKES=10000
IDLE_CONNS=5000
QUICK=0
PEERS=0
OUT=""
PORT_BASE=19400
INSTALL=1
BUILD=1
KEEP_PCAPS=0
LIMEN_BIN_OPT=""
GUARDS=0
ACTIONS=0
H3=0
PROFILE=0
H2_ONLY=0
FLOOR=0
PQ=0
PIN=0

need_value() { [[ $# -ge 2 && -n $2 ]] || { echo "run.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
need_int() { [[ $2 =~ ^[0-9]+$ && $2 -ge ${3:-1} ]] || { echo "run.sh: $1 wants an integer >= ${3:-1}, got '$2'" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --quick) QUICK=1 ;;
        --rounds) need_value "$@"; need_int "$1" "$2"; ROUNDS=$2; shift ;;
        --duration) need_value "$@"; need_int "$1" "$2"; DURATION=$2; shift ;;
        --handshakes) need_value "$@"; need_int "$1" "$2" 32; HANDSHAKES=$2; shift ;;
        --idle-conns) need_value "$@"; need_int "$1" "$2" 10; IDLE_CONNS=$2; shift ;;
        --peers) PEERS=1 ;;
        --out) need_value "$@"; OUT=$2; shift ;;
        --port-base) need_value "$@"; need_int "$1" "$2" 1024; PORT_BASE=$2; shift ;;
        --no-install) INSTALL=0 ;;
        --no-build) BUILD=0 ;;
        --keep-pcaps) KEEP_PCAPS=1 ;;
        --limen-bin) need_value "$@"; LIMEN_BIN_OPT=$2; shift ;;
        --guards) GUARDS=1 ;;
        --guards-only) GUARDS=2 ;;
        --actions) ACTIONS=1 ;;
        --actions-only) ACTIONS=2 ;;
        --h3) H3=1 ;;
        --h3-only) H3=2 ;;
        --profile) PROFILE=1 ;;
        --h2-only) H2_ONLY=1 ;;
        --floor) FLOOR=1 ;;
        --pq) PQ=1 ;;
        --pin) PIN=1 ;;
        *) echo "run.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ $QUICK == 1 ]]; then
    ROUNDS=1 DURATION=3 HANDSHAKES=2000 IDLE_CONNS=1000
fi
((PORT_BASE + 7 <= 65535)) || { echo "run.sh: --port-base too high" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/bench
LIMEN_BIN=${LIMEN_BIN_OPT:-$REPO/target/release/limen}
UPSTREAM_BIN=$REPO/target/release/examples/bench_upstream
OPENLOOP_BIN=$REPO/target/release/examples/bench_openloop
FLOOR_BIN=$REPO/target/release/examples/h2_floor
HANDSHAKES_BIN=$REPO/target/release/examples/bench_handshakes
HTPASSWD_BIN=$REPO/target/release/examples/bench_htpasswd
H3_BIN=$REPO/target/release/examples/bench_h3
[[ -n $OUT ]] || OUT=$REPO/target/bench-results/$(date +%Y%m%d-%H%M%S)

die() { echo "run.sh: error: $*" >&2; exit 1; }
note() { echo "[$(date +%H:%M:%S)] $*" >&2; }
warn() { echo "[$(date +%H:%M:%S)] warning: $*" >&2; WARNINGS+=("$*"); }
WARNINGS=()

# ------------------------------------------------------------------------------------------------
# process bookkeeping: every long-running process is started as its own process group (setsid), so
# that stopping it also stops its children (nginx's worker); all are stopped on exit.

declare -a GROUPS_STARTED=()
PROBE_SET=0
LAST_PID=""

start_bg() { # start_bg NAME CMD... : runs CMD in its own process group, logs to $LOGS/NAME.{out,err}
    local name=$1; shift
    setsid "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err" </dev/null &
    LAST_PID=$!
    GROUPS_STARTED+=("$LAST_PID")
}

stop_group() { # stop_group PID [GRACE_SECONDS]: TERM the group, KILL what is left after the grace
    local pid=$1 grace=${2:-10} i
    kill -TERM -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=() g
    for g in "${GROUPS_STARTED[@]}"; do [[ $g == "$pid" ]] || kept+=("$g"); done
    GROUPS_STARTED=("${kept[@]}")
}

cleanup() {
    local rc=$? g
    trap - EXIT INT TERM
    for g in "${GROUPS_STARTED[@]}"; do stop_group "$g" 5; done
    if ((PROBE_SET == 1)); then perf probe -q -d probe_libc:malloc >/dev/null 2>&1 || true; fi
    [[ $rc == 0 ]] || echo "run.sh: stopped (exit $rc); partial results in $OUT" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------------------------------------
# tools

declare -A PKG_OF=([nginx]=nginx [wrk]=wrk [h2load]=nghttp2-client [tcpdump]=tcpdump [openssl]=openssl
    [curl]=curl [python3]=python3 [cc]=gcc [haproxy]=haproxy [h2o]=h2o [caddy]=caddy [setsid]=util-linux
    [timeout]=coreutils [pgrep]=procps [perf]=linux-perf)
APT_UPDATED=0
apt_install() { # apt_install PKG...: returns non-zero when it cannot install
    [[ $(id -u) == 0 ]] || return 1
    command -v apt-get >/dev/null || return 1
    if [[ $APT_UPDATED == 0 ]]; then
        note "apt-get update"
        timeout 300 apt-get update -qq >"$LOGS/apt.log" 2>&1 || return 1
        APT_UPDATED=1
    fi
    note "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "$@" >>"$LOGS/apt.log" 2>&1
}

ensure_tools() { # ensure_tools CMD...: installs the missing ones or dies
    local missing=() pkgs=() c
    for c in "$@"; do command -v "$c" >/dev/null || { missing+=("$c"); pkgs+=("${PKG_OF[$c]}"); }; done
    [[ ${#missing[@]} == 0 ]] && return 0
    [[ $INSTALL == 1 ]] || die "missing tools: ${missing[*]} (apt packages: ${pkgs[*]}); run without --no-install as root"
    apt_install "${pkgs[@]}" || die "could not install ${pkgs[*]} (see $LOGS/apt.log; root and apt-get are needed)"
    for c in "${missing[@]}"; do command -v "$c" >/dev/null || die "'$c' still missing after installing ${PKG_OF[$c]}"; done
}

# ------------------------------------------------------------------------------------------------
# /proc figures

tree_pids() { # the pid and all its descendants
    local p=$1 c
    echo "$p"
    for c in $(pgrep -P "$p" 2>/dev/null || true); do tree_pids "$c"; done
}

cpu_ticks() { # utime+stime (clock ticks) of a process tree
    local total=0 p v
    for p in $(tree_pids "$1"); do
        v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

mem_kib() { # mem_kib PID FIELD: sum of FIELD (VmRSS, VmHWM) in KiB over the process tree
    local total=0 p v
    for p in $(tree_pids "$1"); do
        v=$(awk -v f="$2:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null) || v=0
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# ------------------------------------------------------------------------------------------------
# setup

mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$OUT/work
LOGS=$OUT/logs
RAW=$OUT/raw
mkdir -p "$WORK" "$LOGS" "$RAW"
METRICS=$OUT/metrics.tsv
: >"$METRICS"
note "results: $OUT"

ensure_tools setsid timeout pgrep nginx wrk h2load tcpdump openssl curl python3 cc

PROXIES=(limen nginx)
if [[ $PEERS == 1 ]]; then
    for peer in haproxy h2o; do
        if command -v "$peer" >/dev/null || { [[ $INSTALL == 1 ]] && apt_install "${PKG_OF[$peer]}" && command -v "$peer" >/dev/null; }; then
            PROXIES+=("$peer")
        else
            warn "peer $peer is not installed and could not be installed: skipped"
        fi
    done
fi

# Caddy runs the compression rows only, started and stopped around them each round
CADDY=0
if ((ACTIONS > 0 || H3 > 0)); then
    if command -v caddy >/dev/null || { [[ $INSTALL == 1 ]] && apt_install caddy && command -v caddy >/dev/null; }; then
        CADDY=1
        # Debian's package starts its own service on :80; it is not ours to stop, and it does not
        # use our ports.
    else
        warn "Caddy is not installed and could not be installed: the compression rows have no Caddy column"
    fi
fi

if [[ $BUILD == 1 ]]; then
    command -v cargo >/dev/null || die "cargo not found (or pass --no-build with the binaries built)"
    note "cargo build --release --bin limen --example bench_upstream --example bench_openloop --example bench_htpasswd --example bench_h3 --example h2_floor --example bench_handshakes"
    (cd "$REPO" && timeout 1800 cargo build --release --bin limen --example bench_upstream --example bench_openloop --example bench_htpasswd --example bench_h3 --example h2_floor --example bench_handshakes) >"$LOGS/cargo.log" 2>&1 ||
        die "cargo build failed, see $LOGS/cargo.log"
fi
[[ -x $LIMEN_BIN ]] || die "$LIMEN_BIN missing: cargo build --release"
[[ -x $UPSTREAM_BIN ]] || die "$UPSTREAM_BIN missing: cargo build --release --example bench_upstream"
[[ -x $OPENLOOP_BIN ]] || die "$OPENLOOP_BIN missing: cargo build --release --example bench_openloop"
((FLOOR == 0)) || [[ -x $FLOOR_BIN ]] || die "$FLOOR_BIN missing: cargo build --release --example h2_floor"
((PQ == 0)) || [[ -x $HANDSHAKES_BIN ]] || die "$HANDSHAKES_BIN missing: cargo build --release --example bench_handshakes"
if ((H3 > 0)); then
    [[ -x $H3_BIN ]] || die "$H3_BIN missing: cargo build --release --example bench_h3"
fi
if ((GUARDS > 0)); then
    [[ -x $HTPASSWD_BIN ]] || die "$HTPASSWD_BIN missing: cargo build --release --example bench_htpasswd"
fi

# file descriptors: idle connections + load generators' connections, with room to spare
NOFILE_NEED=$((IDLE_CONNS + 2000))
if (($(ulimit -Sn) < NOFILE_NEED)); then
    ulimit -Sn "$NOFILE_NEED" 2>/dev/null || ulimit -Sn "$(ulimit -Hn)"
fi
(($(ulimit -Sn) >= NOFILE_NEED)) || die "open files limit $(ulimit -Sn) < $NOFILE_NEED; raise it (ulimit -n) or lower --idle-conns"
((FLOOR == 1)) && PROXIES+=(floor)
MAX_CONNS=$((IDLE_CONNS + 1000))

# ports
declare -A PORT=([upstream]=$PORT_BASE [limen]=$((PORT_BASE + 1)) [nginx]=$((PORT_BASE + 2))
    [haproxy]=$((PORT_BASE + 3)) [h2o]=$((PORT_BASE + 4)) [upstream_h2c]=$((PORT_BASE + 5))
    [upstream_tls]=$((PORT_BASE + 6)) [caddy]=$((PORT_BASE + 7)) [floor]=$((PORT_BASE + 8)))
port_free() { python3 -c 'import socket,sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try: s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError: sys.exit(1)' "$1"; }
for name in upstream upstream_h2c upstream_tls "${PROXIES[@]}" $( ((CADDY == 1)) && echo caddy); do
    port_free "${PORT[$name]}" || die "port 127.0.0.1:${PORT[$name]} ($name) is taken; pick others with --port-base"
done

# certificates: one ECDSA P-256 cert for bench.test (also served when there is no SNI), and one
# more like it for the TLS upstream, which the proxies verify with it as their CA bundle. That one
# says CA:FALSE: `openssl req -x509` marks its cert a CA by default, and rustls (limen) refuses a CA
# certificate as a server's own (CaUsedAsEndEntity). It lives outside limen's cert_dirs.
make_cert() { # make_cert DIR [OPENSSL_REQ_ARGS...]: DIR/tls.crt and DIR/tls.key, self-signed, bench.test
    local dir=$1
    shift
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=bench.test \
        -addext subjectAltName=DNS:bench.test "$@" -keyout "$dir/tls.key" -out "$dir/tls.crt" \
        >>"$LOGS/openssl.log" 2>&1 || die "openssl could not make the certificate in $dir, see $LOGS/openssl.log"
}
: >"$LOGS/openssl.log"
make_cert "$WORK/certs"
cat "$WORK/certs/tls.crt" "$WORK/certs/tls.key" >"$WORK/bench.pem" # haproxy wants both in one file
make_cert "$WORK/upstream-certs" -addext basicConstraints=critical,CA:FALSE
UPSTREAM_CA=$WORK/upstream-certs/tls.crt # self-signed: its own CA bundle
UPSTREAM_NAME=bench.test                 # the name in it, sent as SNI and verified

# the full-handshake client shim
cc -shared -fPIC -O2 -Wall -o "$WORK/no_resume.so" "$BENCH/no_resume.c" -ldl >"$LOGS/cc.log" 2>&1 ||
    die "cannot build bench/no_resume.c, see $LOGS/cc.log"

# ------------------------------------------------------------------------------------------------
# configs: alike where the proxies allow it

# the guard rows' material: one bcrypt user (cost 10) for both proxies, and 999 CIDR blocks the
# client is not in before the one it is in (the last: nginx reads its list in order)
USERS_FILE=$WORK/users.htpasswd
GUARD_AUTH="Authorization: Basic $(printf 'bench:bench' | base64)"
if ((GUARDS > 0)); then
    "$HTPASSWD_BIN" bench bench >"$USERS_FILE" || die "bench_htpasswd failed"
    # nginx reads it in its worker, which runs as another user (limen warns that it is world-readable)
    chmod 0644 "$USERS_FILE"
fi
CIDRS=()
for ((i = 0; i < 999; i++)); do CIDRS+=("10.$((i / 256)).$((i % 256)).0/24"); done
CIDRS+=("127.0.0.0/8")
LIMEN_ALLOW=$(printf '"%s", ' "${CIDRS[@]}")
NGINX_ALLOW=$(printf '            allow %s;\n' "${CIDRS[@]}")

LIMEN_QUIC=""
((H3 > 0)) && LIMEN_QUIC=", quic: \"127.0.0.1:${PORT[limen]}\""
cat >"$WORK/limen.yaml" <<EOF
listen: { https: "127.0.0.1:${PORT[limen]}"$LIMEN_QUIC }
tls: { cert_dirs: ["$WORK/certs"], min_version: "1.3", default_cert: "bench.test" }
workers: 1
access_log: false
limits: { max_connections: $MAX_CONNS }
timeouts: { header_read: 300s, idle: 300s, quic_idle: 300s, shutdown_grace: 2s }
routes:
  - { host: "*", path: "/", upstreams: ["http://127.0.0.1:${PORT[upstream]}"] }
  - { host: "*", path: "/h2c", upstreams: ["h2c://127.0.0.1:${PORT[upstream_h2c]}"] }
  - host: "*"
    path: "/tls"
    upstreams: ["https://127.0.0.1:${PORT[upstream_tls]}"]
    upstream_tls: { ca: "$UPSTREAM_CA", server_name: "$UPSTREAM_NAME" }
    upstream_protocol: http1
EOF
if ((GUARDS > 0)); then
    cat >>"$WORK/limen.yaml" <<EOF
  - { host: "*", path: "/g/none", upstreams: ["http://127.0.0.1:${PORT[upstream]}"] }
  - host: "*"
    path: "/g/access"
    upstreams: ["http://127.0.0.1:${PORT[upstream]}"]
    access: { allow: [${LIMEN_ALLOW%, }] }
  - host: "*"
    path: "/g/rate"
    upstreams: ["http://127.0.0.1:${PORT[upstream]}"]
    rate_limit: { rate: 1000000/s, burst: 1000000 }
  - host: "*"
    path: "/g/basic"
    upstreams: ["http://127.0.0.1:${PORT[upstream]}"]
    auth: { basic: { users_file: "$USERS_FILE" } }
  - host: "*"
    path: "/g/forward"
    upstreams: ["http://127.0.0.1:${PORT[upstream]}"]
    auth: { forward: { url: "http://127.0.0.1:${PORT[upstream]}/auth" } }
EOF
fi

# the routing-action rows (--actions): 500 paths of one host, each with a header-matched canary;
# a regex rewrite; 64 KiB of JSON without and with each coding
NGINX_ACTIONS_HTTP="" NGINX_ACTIONS_SERVER=""
if ((ACTIONS > 0)); then
    UP="http://127.0.0.1:${PORT[upstream]}"
    {
        echo "  - { host: \"*\", path: \"/a/none\", upstreams: [\"$UP\"] }"
        echo "  - host: \"*\""
        echo "    path: \"/r\""
        echo "    upstreams: [\"$UP\"]"
        echo "    rewrite: { path_regex: \"^/r/users/([0-9]+)\$\", replace: \"/users?id=\$1\" }"
        echo "  - { host: \"*\", path: \"/c/none\", upstreams: [\"$UP\"] }"
        for alg in gzip br zstd; do
            echo "  - { host: \"*\", path: \"/c/$alg\", upstreams: [\"$UP\"], compress: { algorithms: [$alg] } }"
        done
        for ((i = 0; i < 500; i++)); do
            echo "  - { host: bench.test, path: \"/m/svc$i\", upstreams: [\"$UP\"] }"
            echo "  - { host: bench.test, path: \"/m/svc$i\", match: { headers: { x-canary: \"true\" } }, upstreams: [\"$UP\"] }"
        done
    } >>"$WORK/limen.yaml"
    NGINX_ACTIONS_HTTP="    map \$http_x_canary \$mpool { \"true\" up_canary; default up; }
    upstream up_canary {
        server 127.0.0.1:${PORT[upstream]};
        keepalive 256;
        keepalive_requests 1000000;
    }"
    NGINX_ACTIONS_SERVER=$(
        echo "        location /a/none/ { proxy_pass http://up; }"
        echo "        location /r/ { rewrite ^/r/users/([0-9]+)\$ /users?id=\$1 break; proxy_pass http://up; }"
        echo "        location /c/none/ { proxy_pass http://up; }"
        echo "        location /c/gzip/ { gzip on; gzip_comp_level 5; gzip_types application/json; gzip_min_length 1024; gzip_proxied any; gzip_vary on; proxy_pass http://up; }"
        for ((i = 0; i < 500; i++)); do echo "        location /m/svc$i/ { proxy_pass http://\$mpool; }"; done
    )
fi

# Caddy: the compression rows (encode) and the HTTP/3 rows (it serves h3 on its https port)
if ((CADDY == 1)); then
    mkdir -p "$WORK/caddy"
    cat >"$WORK/caddy/Caddyfile" <<EOF
{
    admin off
    auto_https off
    storage file_system $WORK/caddy/data
    servers {
        protocols h1 h2 h3
    }
}
https://:${PORT[caddy]} {
    tls $WORK/certs/tls.crt $WORK/certs/tls.key
    handle /c/gzip/* {
        encode {
            gzip 5
            minimum_length 1024
        }
        reverse_proxy 127.0.0.1:${PORT[upstream]}
    }
    handle /c/zstd/* {
        encode {
            zstd
            minimum_length 1024
        }
        reverse_proxy 127.0.0.1:${PORT[upstream]}
    }
    handle {
        reverse_proxy 127.0.0.1:${PORT[upstream]}
    }
}
EOF
fi

mkdir -p "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
worker_rlimit_nofile $NOFILE_NEED;
events { worker_connections $MAX_CONNS; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp;
    proxy_temp_path $WORK/nginx/tmp;
    fastcgi_temp_path $WORK/nginx/tmp;
    uwsgi_temp_path $WORK/nginx/tmp;
    scgi_temp_path $WORK/nginx/tmp;
    # no per-connection request cap (nginx's default of 1000 would add a handshake per 1000 requests)
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    # 256 idle upstream connections kept: the HTTP/2 row keeps 256 requests in flight
    # (h2load -c16 -m16), and with fewer nginx would close and reopen upstream connections all
    # along that run and be charged for it (it was 64 until 2026-12-02)
    upstream up {
        server 127.0.0.1:${PORT[upstream]};
        keepalive 256;
        keepalive_requests 1000000;
    }
${NGINX_ACTIONS_HTTP}
    # grpc_pass carries one request per upstream connection (no multiplexing): with fewer idle
    # connections kept than the 256 streams h2load -c16 -m16 keeps in flight, nginx would close
    # and reopen upstream connections all along the run (a third of the requests with 64)
    upstream up_h2c {
        server 127.0.0.1:${PORT[upstream_h2c]};
        keepalive 256;
        keepalive_requests 1000000;
    }
    upstream up_tls {
        server 127.0.0.1:${PORT[upstream_tls]};
        keepalive 64;
        keepalive_requests 1000000;
    }
    # the guard rows: a limit never reached
    limit_req_zone \$binary_remote_addr zone=guard:10m rate=1000000r/s;
    server {
        listen 127.0.0.1:${PORT[nginx]} ssl http2 default_server;
        server_name bench.test;
        ssl_certificate $WORK/certs/tls.crt;
        ssl_certificate_key $WORK/certs/tls.key;
        ssl_protocols TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        # the headers limen sends upstream, so that both do the same work (inherited by the
        # locations below, none of which sets its own)
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host \$http_host;
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto https;
        proxy_set_header X-Forwarded-Host \$host;
        proxy_set_header Forwarded "for=\$remote_addr;host=\"\$host\";proto=https";
        location / {
            proxy_pass http://up;
        }
        # HTTP/2 to the h2c upstream: grpc_pass is nginx's only HTTP/2 client (a plain GET goes
        # through); Host becomes :authority
        location /h2c/ {
            grpc_pass grpc://up_h2c;
            grpc_set_header Host \$http_host;
            grpc_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            grpc_set_header X-Forwarded-Proto https;
            grpc_set_header X-Forwarded-Host \$host;
            grpc_set_header Forwarded "for=\$remote_addr;host=\"\$host\";proto=https";
        }
        # HTTP/1.1 over TLS to the TLS upstream, its certificate verified, sessions reused
        location /tls/ {
            proxy_pass https://up_tls;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $UPSTREAM_CA;
            proxy_ssl_name $UPSTREAM_NAME;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }
        # the guard rows (--guards): the same route with each guard on
        location /g/none/ { proxy_pass http://up; }
        location /g/access/ {
${NGINX_ALLOW}
            deny all;
            proxy_pass http://up;
        }
        location /g/rate/ {
            limit_req zone=guard burst=1000000 nodelay;
            proxy_pass http://up;
        }
        location /g/basic/ {
            auth_basic "bench";
            auth_basic_user_file $USERS_FILE;
            proxy_pass http://up;
        }
        location /g/forward/ {
            auth_request /_auth;
            proxy_pass http://up;
        }
        location = /_auth {
            internal;
            proxy_pass http://up/auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }
        # the routing-action rows (--actions)
${NGINX_ACTIONS_SERVER}
    }
}
EOF

cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $MAX_CONNS
    tune.ssl.cachesize 20000
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 60s
    timeout http-request 300s
    timeout http-keep-alive 300s
    http-reuse always
frontend fe
    bind 127.0.0.1:${PORT[haproxy]} ssl crt $WORK/bench.pem alpn h2,http/1.1 ssl-min-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host),field(1,:)]
    use_backend be_h2c if { path_beg /h2c/ }
    use_backend be_tls if { path_beg /tls/ }
    default_backend be
backend be
    server up 127.0.0.1:${PORT[upstream]}
backend be_h2c
    server up 127.0.0.1:${PORT[upstream_h2c]} proto h2
backend be_tls
    server up 127.0.0.1:${PORT[upstream_tls]} ssl verify required ca-file $UPSTREAM_CA sni str($UPSTREAM_NAME) verifyhost $UPSTREAM_NAME
EOF

mkdir -p "$WORK/h2o"
cat >"$WORK/h2o/h2o.conf" <<EOF
num-threads: 1
max-connections: $MAX_CONNS
error-log: $WORK/h2o/error.log
http1-request-timeout: 300
http2-idle-timeout: 300
listen:
  host: 127.0.0.1
  port: ${PORT[h2o]}
  ssl:
    certificate-file: $WORK/certs/tls.crt
    key-file: $WORK/certs/tls.key
    minimum-version: TLSv1.3
    ocsp-update-interval: 0
hosts:
  default:
    paths:
      /:
        proxy.reverse.url: http://127.0.0.1:${PORT[upstream]}/
EOF

# the upstream of the TLS-upstream rows: one more nginx, not measured. (The h2c rows' upstream is
# bench_upstream's h2c listener: an nginx there was slower than the proxies' HTTP/2 clients, so the
# h2c rows measured the proxies half idle, and HAProxy's batching could not show.)
NGINX_VERSION=$(nginx -v 2>&1 | sed -n 's#^nginx version: nginx/\([0-9.]*\).*#\1#p')
mkdir -p "$WORK/nginx-upstream/tmp"
cat >"$WORK/nginx-upstream/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $WORK/nginx-upstream/nginx.pid;
error_log $WORK/nginx-upstream/error.log warn;
worker_rlimit_nofile $NOFILE_NEED;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx-upstream/tmp;
    proxy_temp_path $WORK/nginx-upstream/tmp;
    fastcgi_temp_path $WORK/nginx-upstream/tmp;
    uwsgi_temp_path $WORK/nginx-upstream/tmp;
    scgi_temp_path $WORK/nginx-upstream/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    # TLS, HTTP/1.1 only (no h2 in ALPN)
    server {
        listen 127.0.0.1:${PORT[upstream_tls]} ssl;
        server_name $UPSTREAM_NAME;
        ssl_certificate $WORK/upstream-certs/tls.crt;
        ssl_certificate_key $WORK/upstream-certs/tls.key;
        ssl_session_cache shared:UPSTREAM_SSL:10m;
        ssl_session_tickets on;
        location / { return 200 "hello"; }
    }
}
EOF

declare -A START_CMD=(
    [limen]="$LIMEN_BIN --config $WORK/limen.yaml"
    [nginx]="nginx -c $WORK/nginx/nginx.conf -p $WORK/nginx/"
    [haproxy]="haproxy -db -f $WORK/haproxy.cfg"
    [h2o]="h2o -c $WORK/h2o/h2o.conf"
    [floor]="$FLOOR_BIN 127.0.0.1:${PORT[floor]} $WORK/certs/tls.crt $WORK/certs/tls.key 127.0.0.1:${PORT[upstream]} 127.0.0.1:${PORT[upstream_h2c]}"
    [caddy]="env GOMAXPROCS=1 HOME=$WORK/caddy XDG_DATA_HOME=$WORK/caddy/data XDG_CONFIG_HOME=$WORK/caddy/config caddy run --adapter caddyfile --config $WORK/caddy/Caddyfile"
)

# check every config before starting anything
"$LIMEN_BIN" --config "$WORK/limen.yaml" --check >"$LOGS/limen-check.log" 2>&1 ||
    die "limen rejects its bench config: $(tail -5 "$LOGS/limen-check.log")"
nginx -t -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx/" >"$LOGS/nginx-check.log" 2>&1 ||
    die "nginx rejects its bench config: $(tail -5 "$LOGS/nginx-check.log")"
nginx -t -c "$WORK/nginx-upstream/nginx.conf" -p "$WORK/nginx-upstream/" >"$LOGS/nginx-upstream-check.log" 2>&1 ||
    die "nginx rejects the upstream's config: $(tail -5 "$LOGS/nginx-upstream-check.log")"
for peer in haproxy h2o; do
    [[ " ${PROXIES[*]} " == *" $peer "* ]] || continue
    if [[ $peer == haproxy ]]; then check=(haproxy -c -f "$WORK/haproxy.cfg"); else check=(h2o -t -c "$WORK/h2o/h2o.conf"); fi
    if ! "${check[@]}" >"$LOGS/$peer-check.log" 2>&1; then
        warn "$peer rejects its bench config (see $LOGS/$peer-check.log): skipped"
        mapfile -t PROXIES < <(printf '%s\n' "${PROXIES[@]}" | grep -vx "$peer")
    fi
done

# ------------------------------------------------------------------------------------------------
# servers

declare -A PID=() THREADS=() H1_RPS=() OL_RATE=() ACTION_CPU=()

wait_http() { # wait_http NAME PID URL [CURL_OPTION...]: until URL answers 200 `hello`, or die
    local name=$1 pid=$2 url=$3 i body
    shift 3
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$name exited at start: $(tail -5 "$LOGS/$name.err" 2>/dev/null)"
        body=$(curl -sk --max-time 2 "$@" "$url" 2>/dev/null || true)
        [[ $body == hello ]] && return 0
        sleep 0.1
    done
    die "$name did not answer 200 hello on $url within 10 s (logs: $LOGS/$name.err)"
}

start_proxy() { # start_proxy NAME TAG
    local name=$1 tag=$2
    # shellcheck disable=SC2086 # START_CMD values are word lists without quoting needs
    if ((PIN == 1)); then
        start_bg "$name-$tag" taskset -c 1 ${START_CMD[$name]}
    else
        start_bg "$name-$tag" ${START_CMD[$name]}
    fi
    PID[$name]=$LAST_PID
    wait_http "$name-$tag" "${PID[$name]}" "https://127.0.0.1:${PORT[$name]}/"
}

stop_proxy() {
    local name=$1
    [[ -n ${PID[$name]:-} ]] || return 0
    stop_group "${PID[$name]}" 10
    PID[$name]=""
}

alive_or_die() { # alive_or_die NAME WHAT
    kill -0 "${PID[$1]}" 2>/dev/null || die "$1 (pid ${PID[$1]}) died during $2; see $LOGS/"
}

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$METRICS"; }

kv() { # kv FILE KEY: a value from report.py's key=value output
    awk -F= -v k="$2" '$1 == k {sub(/^[^=]*=/, ""); print; exit}' "$1"
}

clk_tck=$(getconf CLK_TCK)
cpu_us_per() { # cpu_us_per TICKS COUNT
    python3 -c 'import sys; t, n, hz = map(float, sys.argv[1:]); print(f"{t * 1e6 / hz / n:.2f}" if n > 0 else "")' "$1" "$2" "$clk_tck"
}

# ------------------------------------------------------------------------------------------------
# one measured run each

run_tool() { # run_tool RAWFILE LIMIT CMD...: run a load generator, bounded, die on a failure
    local raw=$1 limit=$2 rc=0
    shift 2
    if ((PIN == 1)); then set -- taskset -c 0 "$@"; fi
    echo "# $*" >"$raw"
    timeout -k 5 "$limit" "$@" >>"$raw" 2>&1 || rc=$?
    if [[ $rc != 0 ]]; then
        die "'$*' failed (exit $rc$([[ $rc == 124 ]] && echo ", timed out after ${limit}s")); output in $raw"
    fi
}

TCPDUMP_PID=""
capture_start() { # capture_start PCAP PORT: capture only TLS ClientHello/ServerHello packets
    local pcap=$1 port=$2 i
    local off='((tcp[12:1] & 0xf0) >> 2)'
    start_bg "tcpdump" tcpdump -i lo -Z "$(id -un)" --immediate-mode -U -s 1024 -w "$pcap" \
        "tcp port $port and tcp[$off:1] = 0x16 and (tcp[$off+5:1] = 0x01 or tcp[$off+5:1] = 0x02)"
    TCPDUMP_PID=$LAST_PID
    for ((i = 0; i < 100; i++)); do
        grep -q "listening on" "$LOGS/tcpdump.err" 2>/dev/null && return 0
        kill -0 "$TCPDUMP_PID" 2>/dev/null || die "tcpdump failed: $(tail -3 "$LOGS/tcpdump.err")"
        sleep 0.1
    done
    die "tcpdump did not start within 10 s"
}

capture_stop() { # capture_stop RAWFILE: stop tcpdump, append its statistics to RAWFILE
    sleep 0.3
    kill -INT "$TCPDUMP_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do kill -0 "$TCPDUMP_PID" 2>/dev/null || break; sleep 0.1; done
    stop_group "$TCPDUMP_PID" 1
    cat "$LOGS/tcpdump.err" >>"$1"
    if grep -Eq '^[1-9][0-9]* packets dropped by kernel' "$LOGS/tcpdump.err"; then
        warn "tcpdump dropped packets: the hello counts in $1 are a lower bound"
    fi
}

# the proxies that run the rows with an h2c or TLS upstream (h2o 2.2 cannot: see --help)
upstream_rows() { [[ $1 != h2o ]]; }
tls_upstream_rows() { [[ $1 != h2o && $1 != floor ]]; }

test_h1() { # test_h1 ROUND PROXY [h1|h1tls]: HTTP/1.1 keep-alive, to the plain upstream (/) or the TLS one (/tls/)
    local r=$1 p=$2 m=${3:-h1} c0 c1 path=/ what="HTTP/1.1"
    local raw="$RAW/r$r-$p-$m.txt"
    [[ $m == h1tls ]] && path=/tls/ what="HTTP/1.1 -> TLS upstream"
    c0=$(cpu_ticks "${PID[$p]}")
    run_tool "$raw" $((DURATION + 60)) wrk -t1 -c64 -d"${DURATION}s" --latency "https://127.0.0.1:${PORT[$p]}$path"
    c1=$(cpu_ticks "${PID[$p]}")
    alive_or_die "$p" "the $what run"
    python3 "$BENCH/report.py" wrk "$raw" >"$raw.kv"
    local req rps
    req=$(kv "$raw.kv" requests) rps=$(kv "$raw.kv" rps)
    [[ -n $req && -n $rps ]] || die "cannot read wrk's output in $raw"
    record "$r" "$p" "${m}_rps" "$rps"
    if [[ $m == h1 ]]; then H1_RPS[$p]=$rps; fi # this round's, for test_openloop
    record "$r" "$p" "${m}_p50_ms" "$(kv "$raw.kv" p50_ms)"
    record "$r" "$p" "${m}_p99_ms" "$(kv "$raw.kv" p99_ms)"
    record "$r" "$p" "${m}_cpu_us" "$(cpu_us_per $((c1 - c0)) "$req")"
    local bad=$(($(kv "$raw.kv" errors) + $(kv "$raw.kv" non2xx)))
    record "$r" "$p" errors "$bad"
    ((bad == 0)) || warn "$p: $bad socket errors or non-2xx responses in the $what run (round $r), see $raw"
    note "  $p $m: $rps req/s, p99 $(kv "$raw.kv" p99_ms) ms, $(cpu_us_per $((c1 - c0)) "$req") µs CPU/req"
}

guard_rows() { [[ $1 == limen || $1 == nginx ]]; }

test_guards() { # test_guards ROUND PROXY: HTTP/1.1 keep-alive on /g/NAME/ for each guard
    local r=$1 p=$2 g c0 c1 raw req rps bad
    for g in none access rate basic forward; do
        raw="$RAW/r$r-$p-g$g.txt"
        c0=$(cpu_ticks "${PID[$p]}")
        run_tool "$raw" $((DURATION + 60)) wrk -t1 -c64 -d"${DURATION}s" --latency -H "$GUARD_AUTH" \
            "https://127.0.0.1:${PORT[$p]}/g/$g/"
        c1=$(cpu_ticks "${PID[$p]}")
        alive_or_die "$p" "the guard $g run"
        python3 "$BENCH/report.py" wrk "$raw" >"$raw.kv"
        req=$(kv "$raw.kv" requests) rps=$(kv "$raw.kv" rps)
        [[ -n $req && -n $rps ]] || die "cannot read wrk's output in $raw"
        record "$r" "$p" "g_${g}_rps" "$rps"
        record "$r" "$p" "g_${g}_cpu_us" "$(cpu_us_per $((c1 - c0)) "$req")"
        bad=$(($(kv "$raw.kv" errors) + $(kv "$raw.kv" non2xx)))
        record "$r" "$p" errors "$bad"
        ((bad == 0)) || warn "$p: $bad socket errors or non-2xx responses in the guard $g run (round $r), see $raw"
        note "  $p guard $g: $rps req/s, $(cpu_us_per $((c1 - c0)) "$req") µs CPU/req"
    done
}

action_rows() { [[ $1 == limen || $1 == nginx || $1 == caddy ]]; }

test_actions() { # test_actions ROUND PROXY: HTTP/1.1 keep-alive on each routing-action row it has
    local r=$1 p=$2 row path c0 c1 raw req rps bad hdrs coded
    local rows=(none match regex c_none c_gzip)
    [[ $p == limen ]] && rows+=(c_br c_zstd)
    [[ $p == caddy ]] && rows=(c_none c_gzip c_zstd)
    for row in "${rows[@]}"; do
        hdrs=()
        case $row in
            none) path=/a/none/ ;;
            match) path=/m/svc250/x hdrs=(-H "Host: bench.test" -H "x-canary: true") ;;
            regex) path=/r/users/42 ;;
            c_none) path=/c/none/json hdrs=(-H "Accept-Encoding: gzip") ;;
            c_*) path=/c/${row#c_}/json hdrs=(-H "Accept-Encoding: ${row#c_}") ;;
        esac
        raw="$RAW/r$r-$p-a$row.txt"
        if [[ $row == c_* ]]; then
            # what one answer weighs on the wire, and that it is coded as asked
            coded=$(curl -sk --max-time 5 "${hdrs[@]}" -D "$raw.head" -o "$raw.body" -w '%{size_download}' \
                "https://127.0.0.1:${PORT[$p]}$path") || die "$p: curl $path failed"
            record "$r" "$p" "a_${row}_bytes" "$coded"
            if [[ $row != c_none ]] && ! grep -qi "^content-encoding: ${row#c_}" "$raw.head"; then
                warn "$p answered $path without Content-Encoding ${row#c_} (round $r), see $raw.head"
            fi
        fi
        c0=$(cpu_ticks "${PID[$p]}")
        run_tool "$raw" $((DURATION + 60)) wrk -t1 -c64 -d"${DURATION}s" --latency "${hdrs[@]}" \
            "https://127.0.0.1:${PORT[$p]}$path"
        c1=$(cpu_ticks "${PID[$p]}")
        alive_or_die "$p" "the action $row run"
        python3 "$BENCH/report.py" wrk "$raw" >"$raw.kv"
        req=$(kv "$raw.kv" requests) rps=$(kv "$raw.kv" rps)
        [[ -n $req && -n $rps ]] || die "cannot read wrk's output in $raw"
        record "$r" "$p" "a_${row}_rps" "$rps"
        record "$r" "$p" "a_${row}_cpu_us" "$(cpu_us_per $((c1 - c0)) "$req")"
        ACTION_CPU[$row]=$(cpu_us_per $((c1 - c0)) "$req")
        if [[ $row == c_* && $row != c_none ]]; then
            # 64 KiB per answer: 16 answers per MiB
            record "$r" "$p" "a_${row}_ms_mib" "$(python3 -c "print(f'{(${ACTION_CPU[$row]} - ${ACTION_CPU[c_none]}) * 16 / 1000:.2f}')")"
        fi
        bad=$(($(kv "$raw.kv" errors) + $(kv "$raw.kv" non2xx)))
        record "$r" "$p" errors "$bad"
        ((bad == 0)) || warn "$p: $bad socket errors or non-2xx responses in the action $row run (round $r), see $raw"
        note "  $p action $row: $rps req/s, ${ACTION_CPU[$row]} µs CPU/req"
    done
}

test_caddy() { # test_caddy ROUND: Caddy's compression and HTTP/3 rows, on a fresh process
    local r=$1
    start_proxy caddy "r$r"
    ((H3 > 0)) && test_h3_idle "$r" caddy
    run_tool "$RAW/r$r-caddy-warmup.txt" 60 wrk -t1 -c64 -d1s "https://127.0.0.1:${PORT[caddy]}/c/none/json"
    ((ACTIONS > 0)) && test_actions "$r" caddy
    if ((H3 > 0)); then
        test_h2 "$r" caddy
        test_h3 "$r" caddy
    fi
    stop_proxy caddy
}

h3_rows() { [[ $1 == limen || $1 == caddy ]]; }

test_h3() { # test_h3 ROUND PROXY: HTTP/3, examples/bench_h3 -c16 -m16 to / on the proxy's UDP port
    local r=$1 p=$2 c0 c1 raw="$RAW/r$1-$2-h3.txt" req rps bad
    c0=$(cpu_ticks "${PID[$p]}")
    run_tool "$raw" $((DURATION + 60)) "$H3_BIN" --addr "127.0.0.1:${PORT[$p]}" --sni bench.test \
        --connections 16 --streams 16 --duration "$DURATION"
    c1=$(cpu_ticks "${PID[$p]}")
    alive_or_die "$p" "the HTTP/3 run"
    req=$(awk -F= '$1 == "requests" {print $2}' "$raw") rps=$(awk -F= '$1 == "rps" {print $2}' "$raw")
    bad=$(awk -F= '$1 == "errors" {print $2}' "$raw")
    [[ -n $req && -n $rps && -n $bad ]] || die "cannot read bench_h3's output in $raw"
    record "$r" "$p" h3_rps "$rps"
    record "$r" "$p" h3_cpu_us "$(cpu_us_per $((c1 - c0)) "$req")"
    record "$r" "$p" errors "$bad"
    ((bad == 0)) || warn "$p: $bad failed or non-2xx requests in the HTTP/3 run (round $r), see $raw"
    note "  $p h3: $rps req/s, $(cpu_us_per $((c1 - c0)) "$req") µs CPU/req"

    # full QUIC handshakes (+1 request each), no resumption
    local n=$((HANDSHAKES / 2)) hs rate
    raw="$RAW/r$r-$p-h3full.txt"
    c0=$(cpu_ticks "${PID[$p]}")
    run_tool "$raw" 600 "$H3_BIN" --addr "127.0.0.1:${PORT[$p]}" --sni bench.test --handshakes "$n"
    c1=$(cpu_ticks "${PID[$p]}")
    alive_or_die "$p" "the HTTP/3 handshake run"
    hs=$(awk -F= '$1 == "handshakes" {print $2}' "$raw") rate=$(awk -F= '$1 == "rate" {print $2}' "$raw")
    bad=$(awk -F= '$1 == "errors" {print $2}' "$raw")
    [[ -n $hs && -n $rate && -n $bad ]] || die "cannot read bench_h3's output in $raw"
    record "$r" "$p" h3_full_rate "$rate"
    record "$r" "$p" h3_full_cpu_us "$(cpu_us_per $((c1 - c0)) "$hs")"
    record "$r" "$p" errors "$bad"
    note "  $p h3 full handshakes: $rate/s, $(cpu_us_per $((c1 - c0)) "$hs") µs CPU each"

}

test_h3_idle() { # test_h3_idle ROUND PROXY: memory per idle QUIC connection, on a fresh process
    local r=$1 p=$2
    # after one request each, at most 1,000 of them
    local k=$((IDLE_CONNS < 1000 ? IDLE_CONNS : 1000)) m0 m1 i
    sleep 1
    m0=$(mem_kib "${PID[$p]}" VmRSS)
    start_bg "h3idle-$p-r$r" "$H3_BIN" --addr "127.0.0.1:${PORT[$p]}" --sni bench.test --idle "$k" --hold 120
    local idler=$LAST_PID
    for ((i = 0; i < 1200; i++)); do
        grep -q "^opened=" "$LOGS/h3idle-$p-r$r.out" 2>/dev/null && break
        kill -0 "$idler" 2>/dev/null || die "bench_h3 --idle failed: $(tail -3 "$LOGS/h3idle-$p-r$r.err")"
        sleep 0.1
    done
    grep -q "^opened=" "$LOGS/h3idle-$p-r$r.out" || die "bench_h3 --idle did not open $k connections within 120 s"
    sleep 1
    m1=$(mem_kib "${PID[$p]}" VmRSS)
    k=$(awk -F= '$1 == "opened" {print $2}' "$LOGS/h3idle-$p-r$r.out")
    local failed
    failed=$(awk -F= '$1 == "errors" {print $2}' "$LOGS/h3idle-$p-r$r.out")
    ((failed == 0)) || warn "$p: $failed of the idle QUIC connections failed to open (round $r); measured over the $k that did"
    stop_group "$idler" 5
    record "$r" "$p" h3_idle_kib "$(python3 -c "print(f'{($m1 - $m0) / $k:.1f}')")"
    note "  $p h3 idle: $(python3 -c "print(f'{($m1 - $m0) / $k:.1f}')") KiB per connection"
}

test_openloop() { # test_openloop ROUND PROXY PCT: HTTP/1.1 at PCT % of limen's req/s in this round's test_h1
    local r=$1 p=$2 pct=$3 rate raw="$RAW/r$1-$2-ol$3.txt"
    rate=$(awk -v x="${H1_RPS[limen]:-0}" -v f="$pct" 'BEGIN {printf "%d", x * f / 100}')
    ((rate > 0)) || die "no HTTP/1.1 req/s of limen in round $r to set the open-loop rate from"
    OL_RATE[$r-$pct]=$rate
    # bench_openloop takes at most 5 s to connect + 1 s warm-up + D + 5 s for the last answers
    run_tool "$raw" $((DURATION + 60)) "$OPENLOOP_BIN" --url "https://127.0.0.1:${PORT[$p]}/" \
        --rate "$rate" --duration "$DURATION" --connections 64
    alive_or_die "$p" "the open-loop run at $pct %"
    python3 "$BENCH/report.py" openloop "$raw" >"$raw.kv"
    local req bad got
    req=$(kv "$raw.kv" requests) bad=$(kv "$raw.kv" errors) got=$(kv "$raw.kv" rate_achieved)
    [[ -n $req && -n $bad && -n $got ]] || die "cannot read bench_openloop's output in $raw"
    record "$r" "$p" "ol${pct}_p50_ms" "$(kv "$raw.kv" p50_ms)"
    record "$r" "$p" "ol${pct}_p99_ms" "$(kv "$raw.kv" p99_ms)"
    record "$r" "$p" "ol${pct}_rps" "$got"
    record "$r" "$p" errors "$bad"
    ((bad == 0)) || warn "$p: $bad of $req requests failed, were not 2xx or timed out in the open-loop run at $pct % (round $r), see $raw"
    awk -v a="$got" -v t="$rate" 'BEGIN {exit !(a >= 0.97 * t)}' ||
        warn "$p: did not keep up in the open-loop run at $pct % (round $r): $got of $rate req/s"
    note "  $p ol$pct: $rate req/s offered, $got achieved, p50 $(kv "$raw.kv" p50_ms) ms, p99 $(kv "$raw.kv" p99_ms) ms"
}

h2load_checked() { # h2load_checked RAWFILE WHAT: read h2load's output, warn on failures; sets OK_REQ
    local raw=$1 what=$2
    python3 "$BENCH/report.py" h2load "$raw" >"$raw.kv"
    local n_done n_failed n_3xx
    n_done=$(kv "$raw.kv" "done") n_failed=$(kv "$raw.kv" failed) n_3xx=$(kv "$raw.kv" s3xx)
    [[ -n $n_done && -n $n_failed && -n $n_3xx && -n $(kv "$raw.kv" rps) ]] || die "cannot read h2load's output in $raw"
    # done = succeeded (2xx or 3xx) + failed (other statuses, resets, errors). The status counts
    # are taken when a response head arrives, so those of a timed run (-D) also hold streams still
    # open when it ended: the completed 2xx are done - failed - 3xx, not the 2xx count.
    BAD_REQ=$((n_failed + n_3xx))
    OK_REQ=$((n_done - BAD_REQ))
    ((BAD_REQ == 0)) || warn "$what: $BAD_REQ of $n_done requests failed or were not 2xx, see $raw"
    ((OK_REQ > 0)) || die "$what: no request succeeded, see $raw"
}

test_h2() { # test_h2 ROUND PROXY [h2|h2c]: HTTP/2, to the plain upstream (/) or the h2c one (/h2c/)
    local r=$1 p=$2 m=${3:-h2} c0 c1 path=/ what="HTTP/2"
    local raw="$RAW/r$r-$p-$m.txt"
    [[ $m == h2c ]] && path=/h2c/ what="HTTP/2 -> h2c upstream"
    c0=$(cpu_ticks "${PID[$p]}")
    run_tool "$raw" $((DURATION + 60)) h2load -c16 -m16 -D"$DURATION" "https://127.0.0.1:${PORT[$p]}$path"
    c1=$(cpu_ticks "${PID[$p]}")
    alive_or_die "$p" "the $what run"
    h2load_checked "$raw" "$p $what (round $r)"
    [[ $(kv "$raw.kv" protocol) == h2 ]] || die "$p did not negotiate h2 in $raw"
    record "$r" "$p" "${m}_rps" "$(kv "$raw.kv" rps)"
    record "$r" "$p" "${m}_cpu_us" "$(cpu_us_per $((c1 - c0)) "$OK_REQ")"
    record "$r" "$p" errors "$BAD_REQ"
    note "  $p $m: $(kv "$raw.kv" rps) req/s, $(cpu_us_per $((c1 - c0)) "$OK_REQ") µs CPU/req"
}

test_pq() { # test_pq ROUND PROXY: full handshakes by key exchange, a rustls client
    local r=$1 p=$2 g raw c0 c1 n
    local groups=(x25519)
    [[ $p == limen ]] && groups+=(x25519mlkem768)
    for g in "${groups[@]}"; do
        raw="$RAW/r$r-$p-pq-$g.txt"
        c0=$(cpu_ticks "${PID[$p]}")
        run_tool "$raw" 600 "$HANDSHAKES_BIN" --addr "127.0.0.1:${PORT[$p]}" --group "$g" --count "$HANDSHAKES"
        c1=$(cpu_ticks "${PID[$p]}")
        alive_or_die "$p" "the $g handshake run"
        n=$(kv "$raw" handshakes)
        [[ -n $n && $n -gt 0 ]] || die "no handshakes in $raw"
        [[ $(kv "$raw" errors) == 0 ]] || warn "$p: $(kv "$raw" errors) failed $g handshakes (round $r), see $raw"
        record "$r" "$p" "pq_${g}_cpu_us" "$(cpu_us_per $((c1 - c0)) "$n")"
        note "  $p $g handshakes: $(kv "$raw" rate)/s, $(cpu_us_per $((c1 - c0)) "$n") µs CPU each (negotiated $(kv "$raw" group))"
    done
}

perf_stop() { # perf_stop PID: perf writes what it counted on SIGINT
    local i
    kill -INT "$1" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    stop_group "$1" 5
}

PERF_EVENTS=raw_syscalls:sys_enter,context-switches,probe_libc:malloc
profile_setup() { # the uprobe on glibc's malloc, once; removed on exit
    local libc
    libc=$(ldconfig -p | awk '/libc\.so\.6 .*x86-64|libc\.so\.6 .*AArch64/ {print $NF; exit}')
    [[ -n $libc ]] || die "--profile: cannot find libc.so.6"
    perf probe -d probe_libc:malloc >/dev/null 2>&1 || true
    perf probe -q -x "$libc" malloc >"$LOGS/perf-probe.log" 2>&1 ||
        die "--profile: perf cannot probe malloc (root and uprobes needed): $(tail -2 "$LOGS/perf-probe.log")"
    PROBE_SET=1
}

test_profile() { # test_profile ROUND PROXY: the h1, h2 and h2c loads once more, counted by perf stat
    local r=$1 p=$2 m raw pids stat n req sys cs mallocs
    for m in h1 h2 h2c; do
        [[ $m == h2c ]] && ! upstream_rows "$p" && continue
        raw="$RAW/r$r-$p-p$m.txt"
        pids=$(tree_pids "${PID[$p]}" | paste -sd,)
        stat="$raw.perf"
        start_bg "perf-stat-$p" perf stat -x, -e "$PERF_EVENTS" -p "$pids" -o "$stat"
        n=$LAST_PID
        case $m in
            h1) run_tool "$raw" $((DURATION + 60)) wrk -t1 -c64 -d"${DURATION}s" "https://127.0.0.1:${PORT[$p]}/" ;;
            h2) run_tool "$raw" $((DURATION + 60)) h2load -c16 -m16 -D"$DURATION" "https://127.0.0.1:${PORT[$p]}/" ;;
            h2c) run_tool "$raw" $((DURATION + 60)) h2load -c16 -m16 -D"$DURATION" "https://127.0.0.1:${PORT[$p]}/h2c/" ;;
        esac
        perf_stop "$n"
        alive_or_die "$p" "the $m profile run"
        if [[ $m == h1 ]]; then
            python3 "$BENCH/report.py" wrk "$raw" >"$raw.kv"
            req=$(kv "$raw.kv" requests)
        else
            h2load_checked "$raw" "$p $m profile (round $r)"
            req=$OK_REQ
        fi
        [[ -n $req && $req -gt 0 ]] || die "no requests counted in $raw"
        per() { awk -F, -v e="$1" -v n="$req" '$3 == e && $1 ~ /^[0-9.]+$/ {printf "%.2f", $1 / n; f = 1} END {if (!f) print ""}' "$stat"; }
        sys=$(per raw_syscalls:sys_enter) cs=$(per context-switches) mallocs=$(per probe_libc:malloc)
        record "$r" "$p" "${m}_sys" "$sys"
        record "$r" "$p" "${m}_cs" "$cs"
        record "$r" "$p" "${m}_malloc" "$mallocs"
        note "  $p $m per request: $sys syscalls, $cs context switches, $mallocs mallocs"
    done
    if ((r == 1)) && upstream_rows "$p"; then
        # where the cycles go in the HTTP/2 -> h2c row: a call graph of the proxy alone
        pids=$(tree_pids "${PID[$p]}" | paste -sd,)
        start_bg "perf-record-$p" perf record -q -g -F 999 -p "$pids" -o "$RAW/$p-h2c.perf.data"
        n=$LAST_PID
        run_tool "$RAW/r$r-$p-ph2c-record.txt" $((DURATION + 60)) h2load -c16 -m16 -D"$DURATION" "https://127.0.0.1:${PORT[$p]}/h2c/"
        perf_stop "$n"
        perf report -i "$RAW/$p-h2c.perf.data" --no-children --stdio --percent-limit 0.7 --sort dso,symbol \
            >"$OUT/profile-$p-h2c.txt" 2>/dev/null || warn "perf report failed for $p"
        perf report -i "$RAW/$p-h2c.perf.data" --children --stdio -g none --percent-limit 2 --sort symbol \
            >"$OUT/profile-$p-h2c-inclusive.txt" 2>/dev/null || true
        rm -f "$RAW/$p-h2c.perf.data"
    fi
}

test_handshakes() { # test_handshakes ROUND PROXY full|resumed
    local r=$1 p=$2 kind=$3 raw="$RAW/r$1-$2-hs-$3.txt" c0 c1 pre=()
    [[ $kind == full ]] && pre=(env "LD_PRELOAD=$WORK/no_resume.so")
    capture_start "$RAW/r$r-$p-hs-$kind.pcap" "${PORT[$p]}"
    c0=$(cpu_ticks "${PID[$p]}")
    run_tool "$raw" 600 "${pre[@]}" h2load --h1 -c32 -n"$HANDSHAKES" -H 'Connection: close' "https://127.0.0.1:${PORT[$p]}/"
    c1=$(cpu_ticks "${PID[$p]}")
    capture_stop "$raw"
    alive_or_die "$p" "the $kind-handshake run"
    h2load_checked "$raw" "$p $kind handshakes (round $r)"
    python3 "$BENCH/report.py" pcap "$RAW/r$r-$p-hs-$kind.pcap" "${PORT[$p]}" >"$raw.pcap.kv"
    cat "$raw.pcap.kv" >>"$raw"
    [[ $KEEP_PCAPS == 1 ]] || rm -f "$RAW/r$r-$p-hs-$kind.pcap"
    local ch offered sh accepted
    ch=$(kv "$raw.pcap.kv" client_hellos) offered=$(kv "$raw.pcap.kv" offered_psk)
    sh=$(kv "$raw.pcap.kv" server_hellos) accepted=$(kv "$raw.pcap.kv" accepted_psk)
    # every request had its own connection, so its own handshake
    ((sh >= HANDSHAKES * 99 / 100)) ||
        die "$p $kind run: the capture holds $sh ServerHellos for $HANDSHAKES connections; see $raw"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$p" "$kind" "$ch" "$offered" "$sh" "$accepted" >>"$OUT/resumption.tsv"
    if [[ $kind == full ]]; then
        ((offered == 0 && accepted == 0)) ||
            die "$p full-handshake run: $offered ClientHellos offered a session ticket, $accepted resumed: resumption is not disabled"
        record "$r" "$p" full_hs_rate "$(kv "$raw.kv" rps)"
        record "$r" "$p" full_hs_cpu_us "$(cpu_us_per $((c1 - c0)) "$sh")"
    else
        record "$r" "$p" res_hs_rate "$(kv "$raw.kv" rps)"
        record "$r" "$p" res_hs_cpu_us "$(cpu_us_per $((c1 - c0)) "$sh")"
        record "$r" "$p" res_hs_pct "$(python3 -c "print(f'{100 * $accepted / $sh:.2f}')")"
        ((accepted * 10 >= sh * 9)) || warn "$p resumed run (round $r): only $accepted of $sh handshakes resumed"
    fi
    record "$r" "$p" errors "$BAD_REQ"
    note "  $p $kind handshakes: $(kv "$raw.kv" rps)/s, $(cpu_us_per $((c1 - c0)) "$sh") µs CPU each; hellos $ch, PSK offered $offered, accepted $accepted"
}

test_idle() { # memory per idle TLS connection, on a fresh process
    local r=$1 p=$2 raw="$RAW/r$1-$2-idle.txt" ready="$WORK/idle-ready" base m1 m2 i
    rm -f "$ready"
    sleep 0.5
    base=$(mem_kib "${PID[$p]}" VmRSS)
    start_bg "idle-$p" python3 "$BENCH/idle_tls.py" 127.0.0.1 "${PORT[$p]}" "$IDLE_CONNS" --ready-file "$ready" --hold 600
    local client=$LAST_PID
    wait_stage() {
        for ((i = 0; i < 3000; i++)); do
            grep -q "stage=$1" "$ready" 2>/dev/null && return 0
            kill -0 "$client" 2>/dev/null || die "idle_tls.py exited early: $(tail -3 "$LOGS/idle-$p.err")"
            sleep 0.1
        done
        die "idle_tls.py did not finish stage $1 within 300 s"
    }
    wait_stage handshake
    cat "$ready" >"$raw"
    sleep 1
    m1=$(mem_kib "${PID[$p]}" VmRSS)
    local open
    open=$(sed -n 's/.*stage=handshake open=\([0-9]*\).*/\1/p' "$ready")
    kill -USR1 "$client"
    wait_stage request
    cat "$ready" >>"$raw"
    # 5 s idle, as between a keep-alive client's requests: limen hands an HTTP/1.1 connection's
    # buffers back once it has been quiet for a watchdog tick (1 s with the default timeouts),
    # and the freed memory to the OS once the parking has settled (a 1 s tick later).
    sleep 5
    m2=$(mem_kib "${PID[$p]}" VmRSS)
    local ok
    ok=$(sed -n 's/.*stage=request ok=\([0-9]*\).*/\1/p' "$ready")
    stop_group "$client" 5
    alive_or_die "$p" "the idle-connection run"
    echo "rss_kib base=$base after_handshake=$m1 after_request=$m2" >>"$raw"
    ((open == IDLE_CONNS)) || warn "$p: only $open of $IDLE_CONNS idle connections opened (round $r), see $raw"
    ((ok == open)) || warn "$p: only $ok of $open idle connections got a 2xx (round $r), see $raw"
    record "$r" "$p" errors $((IDLE_CONNS - ok))
    ((open > 0)) && record "$r" "$p" idle_hs_kib "$(python3 -c "print(f'{($m1 - $base) / $open:.2f}')")"
    ((ok > 0)) && record "$r" "$p" idle_req_kib "$(python3 -c "print(f'{($m2 - $base) / $ok:.2f}')")"
    note "  $p idle: $(((m1 - base) * 1024 / (open > 0 ? open : 1))) B/conn after handshake, $(((m2 - base) * 1024 / (ok > 0 ? ok : 1))) B/conn after 1 request"
}

# ------------------------------------------------------------------------------------------------
# header facts

START_EPOCH=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
GIT_REV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=""
if (cd "$REPO" && git status --porcelain --untracked-files=no 2>/dev/null | grep -q .); then
    GIT_DIRTY=" with uncommitted changes"
fi
CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
version_of() {
    case $1 in
        limen) echo "limen $GIT_REV$GIT_DIRTY (binary built $(date -u -r "$LIMEN_BIN" +%Y-%m-%d' '%H:%M' UTC'))" ;;
        nginx) nginx -v 2>&1 | sed 's/^nginx version: //' ;;
        haproxy) haproxy -v 2>&1 | head -1 | awk '{print "HAProxy " $3}' ;;
        h2o) h2o --version 2>&1 | head -1 | sed 's/ version / /' ;;
        floor) echo "h2_floor (examples/h2_floor: rustls + hyper, no proxy logic)" ;;
        caddy) caddy version 2>&1 | head -1 | awk '{print "Caddy " $1 " (compression rows, GOMAXPROCS=1)"}' ;;
    esac
}

# ------------------------------------------------------------------------------------------------
# rounds

note "proxies: ${PROXIES[*]}; $ROUNDS round(s), ${DURATION}s runs, $HANDSHAKES handshakes, $IDLE_CONNS idle connections"
if ((PROFILE == 1)); then
    ensure_tools perf
    profile_setup
fi
ON_CPU0=()
((PIN == 1)) && ON_CPU0=(taskset -c 0)
start_bg upstream "${ON_CPU0[@]}" "$UPSTREAM_BIN" "127.0.0.1:${PORT[upstream]}" "127.0.0.1:${PORT[upstream_h2c]}"
UPSTREAM_PID=$LAST_PID
wait_http upstream "$UPSTREAM_PID" "http://127.0.0.1:${PORT[upstream]}/"
wait_http upstream "$UPSTREAM_PID" "http://127.0.0.1:${PORT[upstream_h2c]}/" --http2-prior-knowledge
start_bg nginx-upstream "${ON_CPU0[@]}" nginx -c "$WORK/nginx-upstream/nginx.conf" -p "$WORK/nginx-upstream/"
UPSTREAM2_PID=$LAST_PID
wait_http nginx-upstream "$UPSTREAM2_PID" "https://127.0.0.1:${PORT[upstream_tls]}/"
: >"$OUT/resumption.tsv"

for ((round = 1; round <= ROUNDS; round++)); do
    # rotate the order each round: A B, then B A, ...
    n=${#PROXIES[@]}
    order=()
    for ((i = 0; i < n; i++)); do order+=("${PROXIES[$(((i + round - 1) % n))]}"); done
    note "round $round/$ROUNDS: ${order[*]}"

    for p in "${order[@]}"; do
        start_proxy "$p" "r$round"
        # the h2c and TLS-upstream routes must answer too (a verification failure would be a 502)
        if upstream_rows "$p"; then
            wait_http "$p-r$round" "${PID[$p]}" "https://127.0.0.1:${PORT[$p]}/h2c/"
        fi
        if tls_upstream_rows "$p"; then
            wait_http "$p-r$round" "${PID[$p]}" "https://127.0.0.1:${PORT[$p]}/tls/"
        fi
    done
    sleep 1
    for p in "${order[@]}"; do
        record "$round" "$p" rss_idle_mib "$(python3 -c "print($(mem_kib "${PID[$p]}" VmRSS) / 1024)")"
        THREADS[$p]="$(tree_pids "${PID[$p]}" | wc -l) process(es), $(mem_kib "${PID[$p]}" Threads) thread(s)"
    done
    # warm-up (not measured): upstream pools, allocator, caches
    for p in "${order[@]}"; do
        run_tool "$RAW/r$round-$p-warmup.txt" 60 wrk -t1 -c64 -d1s "https://127.0.0.1:${PORT[$p]}/"
        if upstream_rows "$p"; then
            for path in h2c $(tls_upstream_rows "$p" && echo tls); do
                run_tool "$RAW/r$round-$p-warmup-$path.txt" 60 wrk -t1 -c64 -d1s "https://127.0.0.1:${PORT[$p]}/$path/"
            done
        fi
    done
    # ol50/ol90 after h1: their rates come from limen's h1 run of this round
    TESTS=(h1 ol50 ol90 h2 h2c h1tls full resumed)
    ((GUARDS == 1)) && TESTS+=(guards)
    ((GUARDS == 2)) && TESTS=(guards)
    ((ACTIONS == 1)) && TESTS+=(actions)
    ((ACTIONS == 2)) && TESTS=(actions)
    ((H3 == 1)) && TESTS+=(h3)
    ((H3 == 2)) && TESTS=(h2 full h3)
    ((H2_ONLY == 1)) && TESTS=(h1 h2 h2c)
    ((PROFILE == 1)) && TESTS+=(profile)
    ((PQ == 1)) && TESTS+=(pq)
    for t in "${TESTS[@]}"; do
        for p in "${order[@]}"; do
            case $t in
                h1) test_h1 "$round" "$p" ;;
                ol50) test_openloop "$round" "$p" 50 ;;
                ol90) test_openloop "$round" "$p" 90 ;;
                h2) test_h2 "$round" "$p" ;;
                h2c) if upstream_rows "$p"; then test_h2 "$round" "$p" h2c; fi ;;
                h1tls) if tls_upstream_rows "$p"; then test_h1 "$round" "$p" h1tls; fi ;;
                full | resumed) test_handshakes "$round" "$p" "$t" ;;
                guards) if guard_rows "$p"; then test_guards "$round" "$p"; fi ;;
                actions) if action_rows "$p"; then test_actions "$round" "$p"; fi ;;
                h3) if h3_rows "$p"; then test_h3 "$round" "$p"; fi ;;
                profile) test_profile "$round" "$p" ;;
                pq) test_pq "$round" "$p" ;;
            esac
            kill -0 "$UPSTREAM_PID" 2>/dev/null || die "the upstream died; see $LOGS/upstream.err"
            kill -0 "$UPSTREAM2_PID" 2>/dev/null || die "the nginx upstream died; see $LOGS/nginx-upstream.err"
        done
    done
    sleep 1
    for p in "${order[@]}"; do
        record "$round" "$p" rss_after_mib "$(python3 -c "print($(mem_kib "${PID[$p]}" VmRSS) / 1024)")"
        record "$round" "$p" rss_peak_mib "$(python3 -c "print($(mem_kib "${PID[$p]}" VmHWM) / 1024)")"
        stop_proxy "$p"
    done

    if ((CADDY == 1)); then test_caddy "$round"; fi
    # idle connections, on fresh processes
    for p in "${order[@]}"; do
        start_proxy "$p" "r$round-idle"
        if ((H3 > 0)) && [[ $p == limen ]]; then test_h3_idle "$round" "$p"; fi
        test_idle "$round" "$p"
        stop_proxy "$p"
    done
done
stop_group "$UPSTREAM_PID" 5
stop_group "$UPSTREAM2_PID" 10

# ------------------------------------------------------------------------------------------------
# summary

ELAPSED=$(($(date +%s) - START_EPOCH))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
# limen's WARN/ERROR lines, less rustls' warning for wrk's IP-address SNI (one per wrk connection)
limen_log() { cat "$LOGS"/limen-*.err 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g'; }
IP_SNI='Illegal SNI extension: ignoring IP address'
LIMEN_IP_SNI=$(limen_log | grep -c "$IP_SNI" || true)
LIMEN_LOG_PROBLEMS=$(limen_log | grep -E ' (WARN|ERROR) ' | grep -vc "$IP_SNI" || true)
TLS_FACTS=$(for p in "${PROXIES[@]}"; do
    f="$RAW/r1-$p-h2.txt.kv"
    [[ -f $f ]] || continue
    echo "$p: $(kv "$f" tls) $(kv "$f" cipher), key exchange $(kv "$f" tempkey)"
done | paste -sd ';' | sed 's/;/; /g')
{
    echo "# limen side-by-side benchmark, $(date -u +%Y-%m-%d' '%H:%M' UTC')"
    echo
    echo "- Machine: $(nproc) CPUs ($CPU_MODEL), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr); load average $LOAD_START at start, $LOAD_END at end"
    echo "- Proxies: $(for p in "${PROXIES[@]}" $( ((CADDY == 1)) && echo caddy); do version_of "$p"; done | paste -sd ',' | sed 's/,/, /g'); one worker each; upstream: examples/bench_upstream (one thread; HTTP/1.1, and h2c on port ${PORT[upstream_h2c]}); for the TLS-upstream rows, nginx/$NGINX_VERSION (one worker, \`return 200 \"hello\"\`, TLS with HTTP/1.1 on ${PORT[upstream_tls]}; its CPU not counted)$([[ " ${PROXIES[*]} " == *" h2o "* ]] && echo "; h2o is not in those rows (h2o 2.2 has no HTTP/2 to upstreams and cannot verify an upstream certificate for 127.0.0.1 under another name)")"
    if ((PIN == 1)); then echo "- Pinned (--pin): the proxy under test on CPU 1; load generators, upstreams and everything else on CPU 0"; fi
    echo "- Processes and threads of each proxy: $(for p in "${PROXIES[@]}"; do echo "$p ${THREADS[$p]:-?}"; done | paste -sd ';' | sed 's/;/; /g')"
    echo "- TLS: $TLS_FACTS; ECDSA P-256 certificate; no SNI (https://127.0.0.1:PORT/)"
    echo "- $ROUNDS round(s), order rotated each round; runs of ${DURATION}s; $HANDSHAKES connections per handshake run; $IDLE_CONNS idle connections; $((ELAPSED / 60)) min $((ELAPSED % 60)) s in all"
    echo "- Commands: \`wrk -t1 -c64 -d${DURATION}s --latency\` (to / and, for the TLS upstream, /tls/); \`bench_openloop --rate X --duration $DURATION --connections 64\` (to /); \`h2load -c16 -m16 -D$DURATION\` (to / and, for the h2c upstream, /h2c/); \`h2load --h1 -c32 -n$HANDSHAKES -H 'Connection: close'\` (full: LD_PRELOAD=bench/no_resume.c's shim)"
    echo "- Open loop (examples/bench_openloop, fixed rate after a 1 s warm-up, latency from each request's due time): X = 50 % and 90 % of limen's HTTP/1.1 keep-alive req/s in the same round, the same for every proxy: $(for ((rr = 1; rr <= ROUNDS; rr++)); do echo "round $rr ${OL_RATE[$rr-50]:-?} and ${OL_RATE[$rr-90]:-?} req/s"; done | paste -sd ';' | sed 's/;/; /g')"
    echo "- limen log lines at WARN or ERROR: $LIMEN_LOG_PROBLEMS, besides $LIMEN_IP_SNI of rustls' \"Illegal SNI extension: ignoring IP address\" (wrk sends 127.0.0.1 as SNI)"
    if [[ ${#WARNINGS[@]} -gt 0 ]]; then
        echo "- Warnings:"
        for w in "${WARNINGS[@]}"; do echo "  - $w"; done
    fi
    echo
} >"$OUT/header.md"
{
    echo
    echo "Session resumption check: TLS hellos of each handshake run, counted in a tcpdump capture"
    echo "(a TLS 1.3 ClientHello offers resumption with a pre_shared_key extension, a ServerHello accepts it with one):"
    echo
    echo "| round | proxy | run | ClientHellos | offering a PSK | ServerHellos | accepting a PSK |"
    echo "|---:|---|---|---:|---:|---:|---:|"
    sort -t$'\t' -k1,1n -k3,3 -k2,2 "$OUT/resumption.tsv" | awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7}'
} >"$OUT/footer.md"
{
    python3 "$BENCH/report.py" summary "$METRICS" "$(IFS=,; echo "${PROXIES[*]}$( ((CADDY == 1)) && echo ,caddy)")" "$OUT/header.md" &&
        cat "$OUT/footer.md"
} >"$OUT/summary.md" || die "could not write the summary"
cat "$OUT/summary.md"
note "done in $((ELAPSED / 60)) min $((ELAPSED % 60)) s; results in $OUT"
