"""Generated CSI v1.12 stubs (scripts/gen-proto.sh); do not edit."""
