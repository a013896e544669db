# syntax=docker/dockerfile:1
#
# ims-proxy container image.
#
#   docker build -t ims-proxy .
#   docker run --rm -p 8080:8080 -p 9464:9464 \
#     -v "$PWD/my-config.toml:/etc/ims-proxy/config.toml:ro" \
#     -e WF_CLIENT_ID -e WF_CLIENT_SECRET ims-proxy
#
# The mounted config must listen on 0.0.0.0 (server.listen, server.admin_listen),
# not the 127.0.0.1 default, or nothing outside the container reaches it.
# Secrets: `${VAR}` in the config from `-e VAR` / `--env-file`, or
# `client_secret_file = "/run/secrets/NAME"` with docker or compose secrets.

# --- build: only a Rust toolchain and a C compiler (for ring) are needed -----
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# No debug info in the shipped binary (the release profile keeps some for benchmarks).
ENV CARGO_PROFILE_RELEASE_DEBUG=0
# Cache mounts keep the crate downloads and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ims-proxy \
 && install -m 0755 target/release/ims-proxy /usr/local/bin/ims-proxy

# --- run: glibc, CA certificates, no shell, no package manager ---------------
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/ims-proxy /usr/local/bin/ims-proxy
# Numeric, so Kubernetes can verify runAsNonRoot (the distroless "nonroot" user).
USER 65532:65532
ENV IMS_PROXY_CONFIG=/etc/ims-proxy/config.toml
# client port, admin port (/metrics /healthz /readyz /tokens /reload)
EXPOSE 8080 9464
# distroless has no curl: the binary asks its own admin port (IMS_PROXY_ADMIN, default 127.0.0.1:9464).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/ims-proxy", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ims-proxy"]
CMD ["run"]
