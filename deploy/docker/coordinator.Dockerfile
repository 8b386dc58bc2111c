# The coordinator and the client commands: stylefarm built with the `client` feature, no libtorch.
#   docker build -f deploy/docker/coordinator.Dockerfile -t stylefarm-coordinator .
#   docker run -p 7700:7700 -p 9464:9464 stylefarm-coordinator coordinator --store redis://redis:6379 --blobs s3://bucket
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release -p stylefarm --no-default-features --features client \
    && strip target/release/stylefarm

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/stylefarm --create-home stylefarm
COPY --from=build /src/target/release/stylefarm /usr/local/bin/stylefarm
USER 10001
WORKDIR /var/lib/stylefarm
ENV STYLEFARM_LISTEN=0.0.0.0:7700 \
    STYLEFARM_DATA_DIR=/var/lib/stylefarm/data \
    STYLEFARM_METRICS_LISTEN=0.0.0.0:9464 \
    STYLEFARM_STATUS_LISTEN=0.0.0.0:8080
EXPOSE 7700 9464 8080
ENTRYPOINT ["stylefarm"]
CMD ["coordinator"]
