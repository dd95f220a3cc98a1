# syntax=docker/dockerfile:1
#
# Trellis' images, one target each (docs/install.md#images):
#
#   docker build --target trellis-operator -t ghcr.io/trellis-net/trellis-operator:0.1.0 .
#   docker build --target trellis-node -t ghcr.io/trellis-net/trellis-node:0.1.0 .
#
# One builder stage compiles every binary at once: cargo unifies the
# dependencies' features over one invocation, and both images share it.

FROM docker.io/library/rust:1.95-bookworm AS builder
# clang and libbpf's headers: node-reconciler/build.rs compiles the eBPF
# policy programs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang libbpf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target directory are cache mounts (a rebuild compiles
# only what changed), so the binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p trellis-operator -p trellis-node -p trellis-cni --bins \
 && mkdir -p /out \
 && cp target/release/trellis-operator target/release/trellis-node target/release/trellis /out/

# trellis-operator: talks to the apiserver only; no capabilities, not root.
FROM gcr.io/distroless/cc-debian12:nonroot AS trellis-operator
COPY --from=builder /out/trellis-operator /usr/local/bin/trellis-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/trellis-operator"]

# trellis-node and the CNI plugin it installs on the host (`trellis`, which
# it copies to /opt/cni/bin; the DaemonSet passes this path as
# --cni-plugin-source). Root with NET_ADMIN and SYS_ADMIN (config/manager/node.yaml).
# A Debian base: glibc like the builder, and /var/run -> /run, where the
# DaemonSet mounts the pods' network namespaces.
FROM docker.io/library/debian:bookworm-slim AS trellis-node
COPY --from=builder /out/trellis-node /usr/local/bin/trellis-node
COPY --from=builder /out/trellis /usr/local/bin/trellis
ENTRYPOINT ["/usr/local/bin/trellis-node"]
