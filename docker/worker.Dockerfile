# syntax=docker/dockerfile:1.7
# kiln-worker, in two flavours chosen with --target:
#
#   docker build -f docker/worker.Dockerfile --target cpu  -t kiln/worker:cpu  .
#   docker build -f docker/worker.Dockerfile --target cuda -t kiln/worker:cuda .
#
# Everything the worker loads is installed at BUILD time, pinned by version and sha256, so a
# container needs no network but RabbitMQ, Redis and the OTLP collector:
#   - ONNX Runtime: the CPU build (`onnxruntime` 1.32.0, the build common/src/assets.rs pins) or
#     the GPU build (`onnxruntime-gpu` 1.31.1: CUDA 13 + cuDNN 9, the newest GPU wheel published for
#     manylinux_2_28 x86-64; ort's `api-31` works with both) in /opt/onnxruntime/lib, named by
#     KILN_ORT_DYLIB_PATH. The wheels come from the package registry with
#     `python3 -m pip download --require-hashes`.
#   - The models of models/ : `kiln fetch` (same pins as the worker uses at run time) into
#     /var/cache/kiln, which is KILN_CACHE_DIR. A volume mounted there (Compose's named volume is
#     filled from the image on first use; Kubernetes' emptyDir is seeded by an init container that
#     copies /opt/kiln/cache-seed) keeps the cache writable under a read-only root filesystem.
# The runtime images carry no Python and no pip: a model added to the repository later must be
# fetched into the cache volume with `kiln fetch` from a machine that has them, or baked into a
# rebuilt image.
#
# Needs BuildKit (Docker 23+, `docker compose`): unused targets are skipped and the cache mounts
# keep rebuilds incremental.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG CPU_RUNTIME_IMAGE=debian:bookworm-slim
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# ---- build: the binaries -------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS tools
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*

FROM tools AS source
WORKDIR /src
COPY . .

FROM source AS build-cpu
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=kiln-target-worker-cpu \
    cargo build --release --locked -p kiln-worker -p kiln-cli \
 && install -D -m 0755 target/release/kiln-worker /out/kiln-worker \
 && install -D -m 0755 target/release/kiln /out/kiln

FROM source AS build-cuda
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=kiln-target-worker-cuda \
    cargo build --release --locked -p kiln-worker -p kiln-cli --features kiln-worker/cuda \
 && install -D -m 0755 target/release/kiln-worker /out/kiln-worker \
 && install -D -m 0755 target/release/kiln /out/kiln

# ---- assets: models (shared by both flavours) ------------------------------------------------------
FROM build-cpu AS models
# `kiln fetch` also fetches the CPU ONNX Runtime into the cache; the images carry their own in
# /opt/onnxruntime, so that copy is dropped.
RUN KILN_CACHE_DIR=/opt/kiln/cache-seed KILN_MODELS_DIR=/src/models /out/kiln fetch \
 && rm -rf /opt/kiln/cache-seed/onnxruntime

# ---- assets: ONNX Runtime ---------------------------------------------------------------------------
FROM tools AS ort-cpu
ARG ORT_CPU_PACKAGE=onnxruntime==1.32.0
ARG ORT_CPU_SHA256=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
RUN echo "${ORT_CPU_PACKAGE} --hash=sha256:${ORT_CPU_SHA256}" > /tmp/ort.txt \
 && python3 -m pip download --no-deps --only-binary=:all: --require-hashes --disable-pip-version-check \
      --platform manylinux_2_28_x86_64 --implementation cp --python-version 3.11 -d /tmp/wheels -r /tmp/ort.txt \
 && python3 -c 'import glob, os, zipfile; z = zipfile.ZipFile(glob.glob("/tmp/wheels/*.whl")[0]); os.makedirs("/opt/onnxruntime/lib"); [open("/opt/onnxruntime/lib/" + os.path.basename(n), "wb").write(z.read(n)) for n in z.namelist() if n.startswith("onnxruntime/capi/libonnxruntime")]' \
 && cd /opt/onnxruntime/lib && ln -s libonnxruntime.so.1.* libonnxruntime.so && ls -l

FROM tools AS ort-cuda
ARG ORT_CUDA_PACKAGE=onnxruntime-gpu==1.31.1
ARG ORT_CUDA_SHA256=e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6
RUN echo "${ORT_CUDA_PACKAGE} --hash=sha256:${ORT_CUDA_SHA256}" > /tmp/ort.txt \
 && python3 -m pip download --no-deps --only-binary=:all: --require-hashes --disable-pip-version-check \
      --platform manylinux_2_28_x86_64 --implementation cp --python-version 3.11 -d /tmp/wheels -r /tmp/ort.txt \
 && python3 -c 'import glob, os, zipfile; z = zipfile.ZipFile(glob.glob("/tmp/wheels/*.whl")[0]); os.makedirs("/opt/onnxruntime/lib"); [open("/opt/onnxruntime/lib/" + os.path.basename(n), "wb").write(z.read(n)) for n in z.namelist() if n.startswith("onnxruntime/capi/libonnxruntime")]' \
 && rm -f /opt/onnxruntime/lib/libonnxruntime_providers_tensorrt.so \
 && cd /opt/onnxruntime/lib && ln -s libonnxruntime.so.1.* libonnxruntime.so && ls -l

# ---- runtime: CPU -----------------------------------------------------------------------------------
FROM ${CPU_RUNTIME_IMAGE} AS cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 kiln \
 && useradd --system --uid 10001 --gid kiln --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin kiln
COPY --from=build-cpu /out/kiln-worker /out/kiln /usr/local/bin/
COPY --from=ort-cpu /opt/onnxruntime /opt/onnxruntime
COPY models/ /opt/kiln/models/
COPY --from=models --chown=10001:10001 /opt/kiln/cache-seed /opt/kiln/cache-seed
COPY --from=models --chown=10001:10001 /opt/kiln/cache-seed /var/cache/kiln
ENV KILN_MODELS_DIR=/opt/kiln/models \
    KILN_CACHE_DIR=/var/cache/kiln \
    KILN_ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so \
    KILN_HEALTH_LISTEN=0.0.0.0:9090 \
    KILN_LOG_FORMAT=json
USER 10001:10001
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9090/healthz >/dev/null || exit 1
ENTRYPOINT ["/usr/local/bin/kiln-worker"]

# ---- runtime: CUDA ----------------------------------------------------------------------------------
FROM ${CUDA_RUNTIME_IMAGE} AS cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 kiln \
 && useradd --system --uid 10001 --gid kiln --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin kiln
COPY --from=build-cuda /out/kiln-worker /out/kiln /usr/local/bin/
COPY --from=ort-cuda /opt/onnxruntime /opt/onnxruntime
COPY models/ /opt/kiln/models/
COPY --from=models --chown=10001:10001 /opt/kiln/cache-seed /opt/kiln/cache-seed
COPY --from=models --chown=10001:10001 /opt/kiln/cache-seed /var/cache/kiln
ENV KILN_MODELS_DIR=/opt/kiln/models \
    KILN_CACHE_DIR=/var/cache/kiln \
    KILN_ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so \
    KILN_HEALTH_LISTEN=0.0.0.0:9090 \
    KILN_LOG_FORMAT=json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9090/healthz >/dev/null || exit 1
ENTRYPOINT ["/usr/local/bin/kiln-worker"]
