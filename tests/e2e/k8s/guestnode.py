"""The data-path half of the rig: a background QEMU guest (tests/e2e/guest)
running the SPDK simulator with the kernel nvmet data plane and the node
plugin, both reachable from the host through QEMU port forwards:

  host 127.0.0.1:<rpc_port>   -> guest sim JSON-RPC (--tcp 0.0.0.0:5260), read-only
                                 use by the test's assertions
  host 127.0.0.1:<agent_port> -> guest `csi-spdk agent --listen 0.0.0.0:5261` (mutual
                                 TLS; the controller's only way to this target)
  host 127.0.0.1:<node_port>  -> guest `csi-spdk node --endpoint 0.0.0.0:5270`

The storage agent runs beside the simulator, in the guest, as the chart's
spdkTgt DaemonSet runs it beside spdk_tgt: DH-HMAC-CHAP keys are files the
target reads (keyring_file), so they must be written on the target's host,
which only an agent there can do (PutKey). Its certificates (``AgentPki``:
a CA, a server certificate for 127.0.0.1, the controller's client
certificate) are made on the host and copied into the guest.

The guest also has emulated PCIe NVMe SSDs (``SSDS``, QEMU ``-device nvme``
bound by the guest kernel's driver), so the node plugin's NodeGetInfo reports
a real SSD class label. The host-side controller uses the guest's simulator
as one more SPDK target ("guest"), and the test calls the guest's node plugin over gRPC the way
kubelet would (NodeStage/NodePublish/NodeExpand). Volumes on that target are
exported by the guest kernel's nvmet and connected by the guest kernel's
NVMe/TCP initiator, inside the same guest (dial 127.0.0.1).
"""

from __future__ import annotations

import datetime
import ipaddress
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
GUEST_AGENT_PORT = 5261
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
wait_for 120 test -S /run/csi/spdk.sock || {{ cat /run/csi/sim.log; exit 1; }}
csi-spdk agent --listen 0.0.0.0:{agent} --spdk-rpc unix:///run/csi/spdk.sock \
  --state-dir /var/lib/csi-spdk-agent --tls-cert /etc/agent-tls/tls.crt \
  --tls-key /etc/agent-tls/tls.key --tls-client-ca /etc/agent-tls/ca.crt \
  > /run/csi/agent.log 2>&1 &
csi-spdk node --endpoint 0.0.0.0:{node} --node-id {node_id} --state-dir /var/lib/csi-spdk \
  --topology {topology} > /run/csi/node.log 2>&1 &
i=0
for port in {node} {agent}; do
  until python3 -c 'import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' $port 2>/dev/null; do
    i=$((i+1)); [ $i -lt 240 ] || {{ cat /run/csi/node.log /run/csi/agent.log; exit 1; }}
    sleep 0.5
  done
done
echo {ready}
# Serve until the host stops the guest; show the logs on the way.
tail -n +1 -f /run/csi/sim.log /run/csi/agent.log /run/csi/node.log
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentPki:
    """The guest agent's mutual-TLS certificates, PEM files under ``root``."""

    def __init__(self, root: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        root.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        later = now + datetime.timedelta(days=2)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def write(label: str, key, cert) -> tuple[Path, Path]:
            kp, cp = root / f"{label}.key", root / f"{label}.crt"
            kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
            kp.chmod(0o600)
            cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            return cp, kp

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(name("guest-agent-ca"))
              .issuer_name(name("guest-agent-ca")).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now)
              .not_valid_after(later)
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))

        def leaf(cn: str, server: bool):
            key = ec.generate_private_key(ec.SECP256R1())
            b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                 .public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now).not_valid_after(later)
                 .add_extension(x509.ExtendedKeyUsage(
                     [ExtendedKeyUsageOID.SERVER_AUTH if server
                      else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
            if server:
                b = b.add_extension(x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            return key, b.sign(ca_key, hashes.SHA256())

        self.ca, _ = write("ca", ca_key, ca)
        self.server_cert, self.server_key = write("server", *leaf("guest-agent", True))
        self.client_cert, self.client_key = write("client", *leaf("csi-spdk-controller", False))

    def guest_files(self) -> dict[str, bytes]:
        return {"/etc/agent-tls/ca.crt": self.ca.read_bytes(),
                "/etc/agent-tls/tls.crt": self.server_cert.read_bytes(),
                "/etc/agent-tls/tls.key": self.server_key.read_bytes()}

    def client_tls(self) -> dict[str, str]:
        """The controller config's ``agent.tls``."""
        return {"caFile": str(self.ca), "certFile": str(self.client_cert),
                "keyFile": str(self.client_key)}


class GuestNode:
    """A background guest with the simulator, its storage agent and a node plugin."""

    def __init__(self, node_id: str, topology: str, timeout: int = 1800,
                 pki_dir: Path | None = None) -> None:
        import tempfile
        self.node_id = node_id
        self.rpc_port, self.node_port, self.agent_port = free_port(), free_port(), free_port()
        self.pki = AgentPki(pki_dir or Path(tempfile.mkdtemp(prefix="guest-agent-pki-")))
        script = SCRIPT.format(rpc=GUEST_RPC_PORT, node=GUEST_NODE_PORT, agent=GUEST_AGENT_PORT,
                               node_id=node_id, topology=topology, ready=READY)
        opts = harness.GuestOptions(hostfwd=((self.rpc_port, GUEST_RPC_PORT),
                                             (self.node_port, GUEST_NODE_PORT),
                                             (self.agent_port, GUEST_AGENT_PORT)),
                                    memory_mib=3072, nvme=SSDS)
        self.started = time.monotonic()
        self.handle = harness.start_guest(script, timeout, options=opts,
                                          files=self.pki.guest_files())

    @property
    def rpc_address(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def agent_address(self) -> str:
        return f"127.0.0.1:{self.agent_port}"

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
