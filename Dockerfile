# syntax=docker/dockerfile:1
# csi-spdk driver image: one image for `csi-spdk controller` and `csi-spdk node`.
#
#   docker build -t ghcr.io/csi-spdk/csi-spdk:0.1.0 .
#
# Stage 1 builds the driver and every Python dependency as wheels; stage 2 is a
# slim Debian 13 (trixie, the node guests' release) with the node tools (nvme-cli, mkfs/resize for ext4 and
# xfs, mount/blkid) and installs only those wheels, offline.
ARG BASE_IMAGE=python:3.13-slim-trixie

FROM ${BASE_IMAGE} AS build
WORKDIR /src
# pip/setuptools/wheel pinned so the build is reproducible.
RUN pip install --no-cache-dir pip==26.3 setuptools==84.2.1 wheel==0.48.0
COPY pyproject.toml README.md ./
COPY csi_spdk ./csi_spdk
# --no-build-isolation: build with the pinned setuptools/wheel above.
RUN pip wheel --no-cache-dir --no-build-isolation --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="csi-spdk" \
      org.opencontainers.image.description="Kubernetes CSI driver for SPDK lvols exported over NVMe/TCP" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.13-slim-trixie"

# Debian 13 (trixie) package versions, pinned (apt-cache policy on trixie):
#   nvme-cli     NVMe/TCP connect/disconnect (node)
#   e2fsprogs    mkfs.ext4, resize2fs
#   xfsprogs     mkfs.xfs, xfs_growfs
#   util-linux   blkid; mount provides mount/umount
#   libudev1     for pyudev (block device discovery)
#   cryptsetup-bin  cryptsetup: LUKS2 of encryption: node volumes (node)
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      nvme-cli=2.13-2 \
      e2fsprogs=1.47.2-3+b12 \
      xfsprogs=6.13.0-2+deb13u1 \
      util-linux=2.41.5-0+deb13u1 \
      mount=2.41.5-0+deb13u1 \
      libudev1=257.13-1~deb13u1 \
      cryptsetup-bin=2:2.7.5-2 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels "csi-spdk==${VERSION}" \
 && rm -rf /tmp/wheels \
 && csi-spdk --version

# The node plugin runs privileged as root (nvme connect, mkfs, mount); the
# controller drops every capability in the chart.
ENTRYPOINT ["csi-spdk"]
CMD ["--help"]
