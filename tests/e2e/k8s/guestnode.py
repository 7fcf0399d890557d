"""The data-path half of the rig: a background QEMU guest (tests/e2e/guest)
running the SPDK simulator with the kernel nvmet data plane and the node
plugin, both reachable from the host through QEMU port forwards:

  host 127.0.0.1:<rpc_port>  -> guest sim JSON-RPC (--tcp 0.0.0.0:5260)
  host 127.0.0.1:<node_port> -> guest `csi-spdk node --endpoint 0.0.0.0:5270`

The guest also has emulated PCIe NVMe SSDs (``SSDS``, QEMU ``-device nvme``
bound by the guest kernel's driver), so the node plugin's NodeGetInfo reports
a real SSD class label. The host-side controller uses the guest's simulator
as one more SPDK target ("guest"), and the test calls the guest's node plugin over gRPC the way
kubelet would (NodeStage/NodePublish/NodeExpand). Volumes on that target are
exported by the guest kernel's nvmet and connected by the guest kernel's
NVMe/TCP initiator, inside the same guest (dial 127.0.0.1).
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from guest import harness  # noqa: E402

# Two SSDs of one class: the node reports one ssd.csi-spdk.io/qemu-nvme-ctrl label.
SSDS = (harness.NvmeController("ssd0", "K8SSSD0001", (16 << 20,), slot=0x10),
        harness.NvmeController("ssd1", "K8SSSD0002", (16 << 20,), slot=0x11))
GUEST_RPC_PORT = 5260
GUEST_NODE_PORT = 5270
READY = "K8S-GUEST-READY"

SCRIPT = r"""
. /etc/guest/lib.sh
# init's network set-up can race the virtio NIC's probe: (re)do it here.
modprobe virtio_pci 2>/dev/null; modprobe virtio_net 2>/dev/null
wait_for 30 test -e /sys/class/net/eth0
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0 2>/dev/null || true
ip route add default via 10.0.2.2 2>/dev/null || true
mkdir -p /run/csi /var/lib/csi-spdk
data_dir /tmp/sim 4G
csi-spdk sim --rpc-socket /run/csi/spdk.sock --data-dir /tmp/sim --nvmet \
  --tcp 0.0.0.0:{rpc} > /run/csi/sim.log 2>&1 &
csi-spdk node --endpoint 0.0.0.0:{node} --node-id {node_id} --state-dir /var/lib/csi-spdk \
  --topology {topology} > /run/csi/node.log 2>&1 &
wait_for 120 test -S /run/csi/spdk.sock || {{ cat /run/csi/sim.log; exit 1; }}
i=0
until python3 -c 'import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' {node} 2>/dev/null; do
  i=$((i+1)); [ $i -lt 240 ] || {{ cat /run/csi/node.log; exit 1; }}; sleep 0.5
done
echo {ready}
# Serve until the host stops the guest; show the logs on the way.
tail -n +1 -f /run/csi/sim.log /run/csi/node.log
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GuestNode:
    """A background guest with the simulator and a node plugin."""

    def __init__(self, node_id: str, topology: str, timeout: int = 1800) -> None:
        self.node_id = node_id
        self.rpc_port, self.node_port = free_port(), free_port()
        script = SCRIPT.format(rpc=GUEST_RPC_PORT, node=GUEST_NODE_PORT, node_id=node_id,
                               topology=topology, ready=READY)
        opts = harness.GuestOptions(hostfwd=((self.rpc_port, GUEST_RPC_PORT),
                                             (self.node_port, GUEST_NODE_PORT)),
                                    memory_mib=3072, nvme=SSDS)
        self.started = time.monotonic()
        self.handle = harness.start_guest(script, timeout, options=opts)

    @property
    def rpc_address(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def node_endpoint(self) -> str:
        return f"127.0.0.1:{self.node_port}"

    def wait_ready(self, timeout: float = 240) -> None:
        if not self.handle.wait_for_output(READY, timeout):
            raise RuntimeError(f"guest node not ready after {timeout:.0f}s\n"
                               + self.handle.describe())

    def describe(self) -> str:
        return self.handle.describe()

    def stop(self) -> None:
        self.handle.stop()


missing_prerequisites = harness.missing_prerequisites
