# syntax=docker/dockerfile:1
# Two stages: build with the full Rust toolchain, ship only the binary on a slim Debian.
# Both stages are bookworm, so the binary links against the same glibc it was built with.
# TLS is rustls (no OpenSSL); the runtime needs only the CA certificates for rediss:// and
# sslmode=require connections.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts (BuildKit) keep the crate registry and compiled dependencies between builds, so a
# source change does not recompile every dependency. target/ lives in the cache, hence the copy out.
# --locked: build exactly the versions in Cargo.lock. -p: the daemon only, not the workspace's bench.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p cache-invalidator \
 && cp target/release/cache-invalidator /usr/local/bin/cache-invalidator

FROM debian:bookworm-slim
# Unpinned on purpose: CA certificates should be the current ones, and a pinned Debian version
# disappears from the mirror after the next point release, breaking the build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A fixed, unprivileged uid: runs as non-root, and orchestrators (runAsNonRoot) can check it numerically.
RUN groupadd --system --gid 10001 cache-invalidator \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin cache-invalidator
COPY --from=builder /usr/local/bin/cache-invalidator /usr/local/bin/cache-invalidator
USER 10001:10001
# /metrics and /healthz, when CACHE_INVALIDATOR_METRICS_ADDR is set (e.g. 0.0.0.0:9187).
# docker-compose.yml's healthcheck GETs /healthz with bash's /dev/tcp (bash is part of this base
# image), so no HTTP client is installed for it.
EXPOSE 9187
# SIGTERM (docker stop) makes the daemon finish its batch in flight and exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cache-invalidator"]
CMD ["run"]
