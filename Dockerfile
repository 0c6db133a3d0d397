# syntax=docker/dockerfile:1
# limen container image. Needs BuildKit (the default builder since Docker 23; `COPY --chmod`).
#   docker build -t limen:0.1.0 .
#   docker run --rm -p 8443:8443 limen:0.1.0          # then: curl -k https://localhost:8443/
# No Docker engine runs where this project is developed, so scripts/build-image-rootfs.sh performs
# the same steps (release build, same file layout, `--check` of the built-in config) without Docker,
# and deploy/validate.sh lints this file with hadolint.

# ---- build stage: the official Rust image, pinned to the toolchain the project is tested with.
# bookworm, because the runtime stage is distroless Debian 12: same glibc (2.36), so the
# dynamically linked binary runs there unchanged.
FROM rust:1.95-bookworm AS build
WORKDIR /src

# 1. Dependencies only, cached as their own layer: the real manifest and lockfile with stub
#    sources, so a change to src/ does not rebuild every crate. Cargo.toml names a bench target
#    (benches/scale.rs), which must exist for the manifest to load.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/scale.rs \
    && cargo build --release --locked \
    && rm -rf src benches

# 2. The real sources. `touch` makes them newer than the stub build, whatever mtimes the build
#    context carried, so cargo cannot take the stub's fingerprint for the real crate.
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && ./target/release/limen --version

# ---- runtime stage.
# distroless/cc rather than debian:bookworm-slim: it holds exactly what a glibc Rust binary needs
# (glibc, libgcc_s, CA certificates, tzdata) and no shell, package manager or coreutils, so there
# is nothing to patch or exploit beyond limen itself; `:nonroot` runs as uid/gid 65532. The price:
# no shell for `docker exec` debugging or for a preStop `sleep` (the Kubernetes manifests use the
# built-in `sleep` lifecycle action instead), and no curl for a Docker HEALTHCHECK (Kubernetes
# probes /healthz and /readyz on the admin port instead).
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="limen" \
      org.opencontainers.image.description="A TLS-terminating reverse proxy with passive hot reload of routes and certificates" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=build --chmod=0755 /src/target/release/limen /usr/local/bin/limen
# Root-owned and read-only: limen refuses a config file that is world-writable or owned by another
# non-root user. In Kubernetes a ConfigMap mounted at /etc/limen replaces this file.
COPY --chmod=0444 deploy/container/proxy.yaml /etc/limen/proxy.yaml

# limen writes nothing to disk (logs go to stderr), so the root filesystem can be mounted read-only.
USER 65532:65532
# 8443: HTTPS (TLS), 8080: plain HTTP (308 to https), 9901: admin (health, metrics, status).
EXPOSE 8443 8443/udp 8080 9901
# SIGTERM drains (readiness 503, shutdown_delay, shutdown_grace); Docker's default stop signal.
STOPSIGNAL SIGTERM
ENTRYPOINT ["limen"]
CMD ["--config", "/etc/limen/proxy.yaml"]
