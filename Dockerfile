# imgclf: both binaries in one small image; the command picks which runs.
#   docker build -t imgclf .
#   docker run -p 8000:8000 -e IMGCLF_ADDR=0.0.0.0:8000 imgclf            # embedded default
#   docker run imgclf imgclf-worker                                        # a worker
FROM rust:1-bookworm AS build
# nasm: libjpeg-turbo's SIMD kernels (about twice as fast at decoding JPEG).
RUN apt-get update && apt-get install -y --no-install-recommends nasm && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p imgclf-http -p imgclf-worker \
    && cp target/release/imgclf-http target/release/imgclf-worker /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/imgclf --create-home imgclf
COPY --from=build /usr/local/bin/imgclf-http /usr/local/bin/imgclf-worker /usr/local/bin/
COPY models /opt/imgclf/models
USER imgclf
WORKDIR /var/lib/imgclf
ENV IMGCLF_MODEL=/opt/imgclf/models/efficientnet-lite0 \
    IMGCLF_DATA_DIR=/var/lib/imgclf/data \
    IMGCLF_ADDR=0.0.0.0:8000
EXPOSE 8000
# The binary probes its own /health (the slim image's shell, dash, has no /dev/tcp). Worker
# containers override it: `imgclf-worker healthcheck`, with IMGCLF_METRICS_ADDR set.
HEALTHCHECK --interval=10s --timeout=5s CMD ["imgclf-http", "healthcheck"]
CMD ["imgclf-http"]
