"""PVCs end to end on a real Kubernetes control plane run as plain processes
(docs/k8s-e2e.md)."""
