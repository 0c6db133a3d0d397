#!/usr/bin/env bash
# Builds what the Dockerfile builds, without Docker, and proves it works.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/build-image-rootfs.sh [--no-build] [ROOTFS]

Performs the Dockerfile's steps without a Docker engine:
  1. cargo build --release --locked            (skipped with --no-build: uses target/release/limen)
  2. assembles the runtime image's files under ROOTFS (default: target/image-rootfs):
       usr/local/bin/limen        mode 0755
       etc/limen/proxy.yaml       mode 0444, from deploy/container/proxy.yaml
  3. checks them the way the image runs them:
       - the binary needs only libraries gcr.io/distroless/cc-debian12 has, and glibc <= 2.36
       - `usr/local/bin/limen --config etc/limen/proxy.yaml --check`, run from ROOTFS as
         uid/gid 65532 (the image's user) when this script runs as root
       - the Kubernetes ConfigMap's proxy.yaml (deploy/kubernetes/configmap.yaml) passes --check
         against a kubelet-style Secret volume: ..data symlink swap layout, files root:65532 0440,
         read as uid 65532 with group 65532 (runAsGroup/fsGroup); needs openssl for a test cert

Options:
  --no-build   use the existing target/release/limen (or $LIMEN_BIN) instead of building
  -h, --help   print this help

Exits non-zero if any step fails.
EOF
}

build=1
rootfs=
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --no-build) build=0 ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *)
      [ -z "$rootfs" ] || { echo "error: more than one ROOTFS given" >&2; exit 2; }
      rootfs=$1
      ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
repo=$PWD
rootfs=${rootfs:-target/image-rootfs}
case "$(cd "$(dirname "$rootfs")" 2>/dev/null && pwd)/$(basename "$rootfs")" in
  / | /. | "$repo" | "$repo/." | "$HOME")
    echo "error: refusing to use $rootfs as ROOTFS (it is emptied first)" >&2
    exit 2
    ;;
esac
bin=${LIMEN_BIN:-target/release/limen}
start=$SECONDS
step() { printf '\n== %s (%ss)\n' "$1" "$((SECONDS - start))"; }

# Run a command as the image's user (uid/gid 65532, supplementary group 65532 as fsGroup gives it)
# when we are root and can switch; otherwise as ourselves.
as_image_user() {
  if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null 2>&1; then
    setpriv --reuid=65532 --regid=65532 --groups=65532 -- "$@"
  else
    "$@"
  fi
}

if [ "$build" = 1 ]; then
  step "cargo build --release --locked"
  cargo build --release --locked
  bin=target/release/limen
else
  step "--no-build: using $bin"
fi
[ -x "$bin" ] || { echo "error: $bin is missing; build it or drop --no-build" >&2; exit 1; }

step "assemble $rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/limen"
install -m 0755 "$bin" "$rootfs/usr/local/bin/limen"
install -m 0444 deploy/container/proxy.yaml "$rootfs/etc/limen/proxy.yaml"
chmod 0755 "$rootfs" "$rootfs/usr" "$rootfs/usr/local" "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/etc/limen"
(cd "$rootfs" && find . -mindepth 1 -printf '%M %u:%g %10s %p\n' | sort -k4)

step "shared libraries and glibc version (runtime base: distroless cc-debian12, glibc 2.36)"
limen_bin="$rootfs/usr/local/bin/limen"
if command -v readelf >/dev/null 2>&1; then
  # distroless/cc = glibc + libgcc_s + libstdc++ (plus CA certificates and tzdata).
  allowed=' libc.so.6 libm.so.6 libgcc_s.so.1 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 libstdc++.so.6 ld-linux-x86-64.so.2 ld-linux-aarch64.so.1 '
  needed=$(readelf -d "$limen_bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
  echo "NEEDED: $(echo "$needed" | tr '\n' ' ')"
  for lib in $needed; do
    case "$allowed" in
      *" $lib "*) ;;
      *) echo "error: limen needs $lib, which distroless/cc-debian12 does not ship" >&2; exit 1 ;;
    esac
  done
  newest=$(readelf -V --wide "$limen_bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n | uniq | tail -1)
  echo "newest glibc symbol version required: ${newest:-none}"
  if [ -n "$newest" ] && [ "$(printf '%s\n2.36\n' "$newest" | sort -t. -k1,1n -k2,2n | tail -1)" != 2.36 ]; then
    echo "error: limen needs glibc $newest, newer than Debian 12's 2.36: build on bookworm (as the Dockerfile does)" >&2
    exit 1
  fi
else
  echo "skipped: readelf (binutils) is not installed"
fi

step "limen --version; --config etc/limen/proxy.yaml --check (from the rootfs, as the image's user)"
echo "running as: $(as_image_user id)"
(cd "$rootfs" && as_image_user ./usr/local/bin/limen --version)
(cd "$rootfs" && as_image_user ./usr/local/bin/limen --config etc/limen/proxy.yaml --check)

step "Kubernetes ConfigMap's proxy.yaml --check against a kubelet-style Secret volume"
if ! command -v openssl >/dev/null 2>&1; then
  echo "skipped: openssl is not installed (needed to make a test certificate)"
  step "done in $((SECONDS - start))s (Kubernetes check skipped)"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 0755 "$tmp"

# data.proxy.yaml of the ConfigMap: the block scalar after `  proxy.yaml: |`, un-indented.
config_text=$(awk '
  /^  proxy\.yaml: \|/ { inblock = 1; next }
  inblock && /^[^ ]/ { exit }
  inblock && /^   ? ?[^ ]/ && !/^    / { exit }
  inblock { sub(/^    /, ""); print }
' deploy/kubernetes/configmap.yaml)
[ -n "$config_text" ] || { echo "error: no data.proxy.yaml in deploy/kubernetes/configmap.yaml" >&2; exit 1; }
secret_mount=/var/run/limen/certs/limen-tls
grep -q "cert_dirs: \[\"/var/run/limen/certs\"\]" <<<"$config_text" \
  || { echo "error: the ConfigMap's tls.cert_dirs is not [\"/var/run/limen/certs\"]; update this script" >&2; exit 1; }
hosts=$(sed -n 's/^ *host: "\([^"*]*\)".*/\1/p' <<<"$config_text" | sort -u)
[ -n "$hosts" ] || hosts=localhost

# kubelet's atomic writer layout: files in ..TIMESTAMP/, ..data -> ..TIMESTAMP, NAME -> ..data/NAME.
kubelet_volume() { # DIR MODE FILE...  (files are taken from $tmp/src)
  local dir=$1 mode=$2 ts
  shift 2
  ts="..$(date -u +%Y_%m_%d_%H_%M_%S).$$"
  mkdir -p "$dir/$ts"
  for f in "$@"; do
    install -m "$mode" "$tmp/src/$f" "$dir/$ts/$f"
    [ "$(id -u)" != 0 ] || chown 0:65532 "$dir/$ts/$f"
    ln -s "..data/$f" "$dir/$f"
  done
  ln -s "$ts" "$dir/..data"
  chmod 0755 "$dir" "$dir/$ts"
}
mkdir -p "$tmp/src"
san=$(for h in $hosts; do printf 'DNS:%s,' "$h"; done)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj "/CN=$(head -1 <<<"$hosts")" -addext "subjectAltName=${san%,}" \
  -keyout "$tmp/src/tls.key" -out "$tmp/src/tls.crt" 2>/dev/null
# The admin token's and the ticket keys' Secrets (listen.admin_token_file, tls.ticket_keys).
openssl rand -hex 32 >"$tmp/src/token"
openssl rand -base64 80 | tr -d '\n' >"$tmp/src/keys"
# Where the pod sees /var/run/limen/..., this check uses $tmp/var/run/limen/....
printf '%s\n' "${config_text//\/var\/run\/limen\//$tmp/var/run/limen/}" >"$tmp/src/proxy.yaml"
kubelet_volume "$tmp/etc/limen" 0444 proxy.yaml
kubelet_volume "$tmp$secret_mount" 0440 tls.crt tls.key
grep -q "admin_token_file: /var/run/limen/admin/token" <<<"$config_text" \
  && kubelet_volume "$tmp/var/run/limen/admin" 0440 token
grep -q "ticket_keys: /var/run/limen/tickets/keys" <<<"$config_text" \
  && kubelet_volume "$tmp/var/run/limen/tickets" 0440 keys
chmod 0755 "$tmp/var" "$tmp/var/run" "$tmp/var/run/limen" "$tmp/var/run/limen/certs" "$tmp/etc"
ls -la "$tmp$secret_mount"
if as_image_user "$limen_bin" --config "$tmp/etc/limen/proxy.yaml" --check >"$tmp/out" 2>"$tmp/err"; then
  cat "$tmp/out"
else
  cat "$tmp/out" "$tmp/err" >&2
  exit 1
fi
cat "$tmp/err"
if grep -q "1 certificates)" "$tmp/out" && ! grep -Eq "world-readable|no certificate covers|refused" "$tmp/err"; then
  echo "ConfigMap config OK: its certificate loaded from the kubelet-style Secret mount, no warnings"
else
  echo "error: expected one certificate loaded and no permission or coverage warning" >&2
  exit 1
fi

step "done in $((SECONDS - start))s: $rootfs holds the image's files"
