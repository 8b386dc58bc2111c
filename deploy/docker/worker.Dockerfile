# A worker: stylefarm with the engine, libtorch 2.11.0 from PyPI's wheels (TORCH=cu130, the default: the
# CUDA build and its NVIDIA libraries; TORCH=cpu: the lean CPU copy) and the VGG19 weights converted at build
# time (deploy/setup.sh, sha256-pinned). The NVIDIA container toolkit supplies the driver at run time.
#   docker build -f deploy/docker/worker.Dockerfile -t stylefarm-worker .
#   docker build -f deploy/docker/worker.Dockerfile --build-arg TORCH=cpu -t stylefarm-worker:cpu .
#   docker run --gpus all stylefarm-worker worker --coordinator http://coordinator:7700 --device cuda:0
FROM rust:1.95-bookworm AS build
ARG TORCH=cu130
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# libtorch, the weights and the converter's venv under /opt/stylefarm; the binary's rpath points there
ENV STYLEFARM_HOME=/opt/stylefarm STYLEFARM_TORCH=${TORCH}
RUN bash deploy/setup.sh \
    && cargo build --locked --release -p stylefarm \
    && strip target/release/stylefarm \
    && rm -rf /opt/stylefarm/downloads /opt/stylefarm/venv

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/stylefarm --create-home stylefarm
COPY --from=build /opt/stylefarm /opt/stylefarm
COPY --from=build /src/target/release/stylefarm /usr/local/bin/stylefarm
USER 10001
WORKDIR /var/lib/stylefarm
ENV STYLEFARM_WEIGHTS=/opt/stylefarm/weights/vgg19-caffe.safetensors \
    STYLEFARM_METRICS_LISTEN=0.0.0.0:9465 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 9465
ENTRYPOINT ["stylefarm"]
CMD ["worker", "--device", "auto"]
