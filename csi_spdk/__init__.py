"""csi-spdk: a CSI driver for SPDK lvols exported over NVMe/TCP."""

__version__ = "0.1.0"
DEFAULT_DRIVER_NAME = "csi-spdk.io"
