"""The rig's PVC scenarios on a kind cluster with the Helm chart installed."""
