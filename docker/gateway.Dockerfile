# syntax=docker/dockerfile:1.7
# kiln-gateway: the HTTP API. It never links ONNX Runtime, so the image holds the binary, the model
# repository's kiln.toml files (for input schemas) and curl for the health check.
#
#   docker build -f docker/gateway.Dockerfile -t kiln/gateway:dev .
#
# Needs BuildKit (Docker 23+, `docker compose`): the cache mounts keep rebuilds incremental.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=kiln-target-gateway \
    cargo build --release --locked -p kiln-gateway -p kiln-cli \
 && install -D -m 0755 target/release/kiln-gateway /out/kiln-gateway \
 && install -D -m 0755 target/release/kiln /out/kiln

FROM ${RUNTIME_IMAGE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 kiln \
 && useradd --system --uid 10001 --gid kiln --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin kiln
COPY --from=build /out/kiln-gateway /out/kiln /usr/local/bin/
COPY models/ /opt/kiln/models/
ENV KILN_LISTEN=0.0.0.0:8080 \
    KILN_MODELS_DIR=/opt/kiln/models \
    KILN_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz >/dev/null || exit 1
ENTRYPOINT ["/usr/local/bin/kiln-gateway"]
