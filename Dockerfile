# syntax=docker/dockerfile:1
# imgclf: both binaries and ONNX Runtime in one small image; the command picks which runs.
#   docker build -t imgclf .
#   docker run -p 8000:8000 imgclf                          # embedded default (HTTP + worker)
#   docker run -e IMGCLF_QUEUE=amqp://… -e IMGCLF_RESULTS=postgres://… -e IMGCLF_STORAGE=s3://… \
#     -e IMGCLF_METRICS_ADDR=0.0.0.0:9101 imgclf imgclf-worker     # a worker (a shared queue)
# Base images are pinned by tag (a digest is better where your registry mirror can resolve it).

# ONNX Runtime's shared library comes from the `onnxruntime` wheel on PyPI, the same version
# scripts/setup-ort.sh installs (scripts/validate-deploy.sh checks they agree).
ARG ORT_VERSION=1.32.0

FROM python:3.11-slim-bookworm AS ort
ARG ORT_VERSION
RUN pip install --no-cache-dir --no-deps --only-binary :all: "onnxruntime==${ORT_VERSION}" \
    && mkdir /opt/onnxruntime \
    && cp /usr/local/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime*.so* \
       /opt/onnxruntime/

FROM rust:1.95-bookworm AS build
# nasm: libjpeg-turbo's SIMD kernels (about twice as fast at decoding JPEG).
RUN apt-get update && apt-get install -y --no-install-recommends nasm && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p imgclf-http -p imgclf-worker \
    && cp target/release/imgclf-http target/release/imgclf-worker /usr/local/bin/

FROM debian:bookworm-slim
ARG ORT_VERSION
# libstdc++ and libgcc (ONNX Runtime's only needs beyond libc) are part of the slim image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/imgclf --create-home imgclf
COPY --from=ort /opt/onnxruntime /opt/onnxruntime
COPY --from=build /usr/local/bin/imgclf-http /usr/local/bin/imgclf-worker /usr/local/bin/
COPY models /opt/imgclf/models
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/imgclf
# ort: ONNX Runtime, about twice tract's speed on these models; set IMGCLF_CLASSIFIER=tract for
# the pure-Rust backend. Named, not `auto`, so a broken library fails the start loudly instead
# of running at half speed.
ENV IMGCLF_MODEL=/opt/imgclf/models/efficientnet-lite0 \
    IMGCLF_CLASSIFIER=ort \
    IMGCLF_ORT_LIB=/opt/onnxruntime/libonnxruntime.so.${ORT_VERSION} \
    IMGCLF_DATA_DIR=/var/lib/imgclf/data \
    IMGCLF_ADDR=0.0.0.0:8000
EXPOSE 8000
# The binaries probe their own /health (the slim image's shell, dash, has no /dev/tcp): the API's
# on IMGCLF_ADDR, else a worker's on IMGCLF_METRICS_ADDR, so one image checks either command.
# The start period covers loading the model and timing it.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s \
    CMD imgclf-http healthcheck || imgclf-worker healthcheck
CMD ["imgclf-http"]
