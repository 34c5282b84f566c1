# migtun host agent image.
#   docker build -t migtun .
#   docker run --network host -v /etc/migtun:/etc/migtun:ro -v /run/migtun:/run/migtun migtun serve --config /etc/migtun/migtun.toml
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin migtun

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/migtun /usr/local/bin/migtun
# TCP and UDP: TLS and (with the QUIC transport) QUIC share the port number.
EXPOSE 7443/tcp 7443/udp
ENTRYPOINT ["/usr/local/bin/migtun"]
CMD ["serve", "--config", "/etc/migtun/migtun.toml"]
