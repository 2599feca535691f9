# syntax=docker/dockerfile:1
# pushd and pushctl in a small image: built in the Rust image, run on distroless (glibc, no
# shell, no package manager) as an unprivileged user.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and build directory between builds; the binaries are
# copied out of the cached target/ before the layer is sealed.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pushd --bin pushd -p pushctl --bin pushctl \
 && install -D -m 0755 target/release/pushd target/release/pushctl -t /out/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/pushd /out/pushctl /usr/local/bin/
# Clients and backends on 8080; /admin/* and /metrics on 9091, which only the operator network
# reaches. pushctl inside the container talks to its own node by default.
ENV PUSHD_LISTEN=0.0.0.0:8080 \
    PUSHD_ADMIN_LISTEN=0.0.0.0:9091 \
    PUSHD_LOG_FORMAT=json \
    PUSHCTL_SERVER=http://127.0.0.1:9091
EXPOSE 8080 9091
USER nonroot:nonroot
# SIGTERM starts the drain (readiness off, grace, clients closed over --drain-window); give the
# container a stop timeout longer than grace + window (docker-compose.yml: stop_grace_period).
STOPSIGNAL SIGTERM
# `pushd probe` asks the node's own /healthz: no curl or shell needed in the image.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["/usr/local/bin/pushd", "probe"]
ENTRYPOINT ["/usr/local/bin/pushd"]
