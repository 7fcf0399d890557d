"""QEMU guest harness for the real NVMe/TCP data path (see harness.py)."""
