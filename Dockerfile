# migtun host agent image (README.md, "Deploying").
#   docker build -t migtun .
#   docker run --network host \
#     -v /etc/migtun:/etc/migtun:ro -v /run/migtun:/run/migtun \
#     -v /var/lib/migtun:/var/lib/migtun -v /run/vms:/run/vms migtun
# The agent needs the host's network (one port for peers, TCP and UDP) and the host's socket
# directories; it runs as the unprivileged user migtun (10001) unless told otherwise: see
# "Who the agent runs as" in README.md for when it must be root.
# tests/deploy_container.rs runs this file's ENTRYPOINT, CMD and HEALTHCHECK against a real
# config laid out like the volumes below, and lints it with hadolint.

# The toolchain the image is built with; the workspace needs 1.85 or newer.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: only the manifests and the lock file, with stub
# sources, so that editing migtun's code does not rebuild (or re-download) the dependencies.
COPY Cargo.toml Cargo.lock ./
COPY proxy/Cargo.toml proxy/
COPY control/Cargo.toml control/
COPY certs/Cargo.toml certs/
RUN mkdir -p src proxy/src control/src certs/src benches \
    && echo 'fn main() {}' > src/main.rs \
    && for b in throughput latency migration report; do echo 'fn main() {}' > "benches/$b.rs"; done \
    && touch proxy/src/lib.rs control/src/lib.rs certs/src/lib.rs \
    && cargo fetch --locked \
    && cargo build --release --locked --bin migtun \
    && rm -rf src proxy/src control/src certs/src benches
# Then migtun itself. COPY keeps the files' modification times, which may be older than the
# stubs' build: touch them so that cargo rebuilds migtun's own crates.
COPY . .
RUN find src proxy/src control/src certs/src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin migtun \
    && install -m 0755 target/release/migtun /usr/local/bin/migtun

FROM debian:bookworm-slim
# Nothing from apt: migtun links only glibc, and it trusts tls.ca alone, never a system store.
RUN groupadd --system --gid 10001 migtun \
    && useradd --system --uid 10001 --gid migtun --home-dir /var/lib/migtun --no-create-home \
        --shell /usr/sbin/nologin migtun \
    && install -d -o migtun -g migtun -m 0750 /run/migtun /var/lib/migtun \
    && install -d -o migtun -g migtun -m 0755 /run/vms \
    && install -d -m 0755 /etc/migtun
COPY --from=build /usr/local/bin/migtun /usr/local/bin/migtun
# The example prepare hook (Python 3 and QEMU are not in this image: see README.md).
COPY contrib/prepare-hook /usr/local/share/migtun/prepare-hook
# /run/migtun: forward sockets, the admin socket and qemu.run_dir (sockets QEMU connects to);
# /var/lib/migtun: qemu.state_dir, the migration journal, which must survive a restart;
# /run/vms: the VMs' QMP sockets that `migtun migrate --qmp` names.
# /etc/migtun (config and certificates) is mounted read-only and is not a volume.
VOLUME ["/run/migtun", "/var/lib/migtun", "/run/vms"]
# TCP and UDP: TLS and (with the QUIC transport) QUIC share the port number (`listen`).
EXPOSE 7443/tcp 7443/udp
USER 10001:10001
# GET /healthz on the metrics address: the config must set metrics = "127.0.0.1:9477" (or
# "0.0.0.0:9477"); with another address, override the health check (docker run --health-cmd).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/migtun", "healthcheck", "--metrics", "127.0.0.1:9477"]
# SIGTERM drains (open streams run on for drain_timeout_secs); give `docker stop -t` that long.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/migtun"]
CMD ["serve", "--config", "/etc/migtun/migtun.toml"]
