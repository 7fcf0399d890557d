"""Local NVMe SSD discovery through the guest kernel's real ``nvme`` driver.

The guest gets three emulated PCIe NVMe SSDs (QEMU ``-device nvme``, bound by
the cloud kernel's built-in driver): A (two namespaces) and B with QEMU's PCI
ids, C with Intel's. QEMU's model string is fixed ("QEMU NVMe Ctrl"), so A
and B are one SSD class and C, by its vendor id, another. With the CSI stack
running (simulator with kernel nvmet, controller, node plugin), a volume is
staged over NVMe/TCP; then:

* ``csi-spdk discover`` (JSON and table) lists exactly A, B and C, with the
  PCI address, vendor/device ids QEMU itself reports (QMP ``query-pci``),
  model, serial, firmware, namespaces with their sizes and the capacity,
  and not the NVMe/TCP controller, whose namespace is in /sys all the while;
* NodeGetInfo carries one label per class (two, for three SSDs);
* C is hot-unplugged (QMP ``device_del``; ACPI PCI hotplug on i440fx): the
  next NodeGetInfo and discover no longer report it and its label is gone;
  then B: its class label stays (A is left). NodeGetInfo never fails, the
  node plugin logs no error, the staged volume still reads back its data,
  and the plugin exits cleanly at the end.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from guest.harness import GuestOptions, NvmeController, start_guest

pytestmark = [pytest.mark.guest, pytest.mark.timeout(600)]

MiB = 1 << 20
SSDS = (
    NvmeController("ssda", "CSIA0001", (16 * MiB, 8 * MiB), slot=0x10),
    NvmeController("ssdb", "CSIB0002", (32 * MiB,), slot=0x11),
    NvmeController("ssdc", "CSIC0003", (24 * MiB,), intel_id=True, slot=0x12),
)
MODEL = "QEMU NVMe Ctrl"
QEMU_CLASS = "ssd.csi-spdk.io/qemu-nvme-ctrl"
INTEL_CLASS = "ssd.csi-spdk.io/intel-qemu-nvme-ctrl"
IDS = {False: ("1b36", "0010"), True: ("8086", "5845")}   # QEMU's, use-intel-id=on

DRIVER = r'''
import json, os, subprocess, sys, time
from pathlib import Path

import grpc
from csi_spdk import contract
from csi_spdk.proto import csi_pb2 as csi
from csi_spdk.proto import csi_pb2_grpc as csi_grpc

RUN = "/run/csi"
# node-stage secrets: csi_stack_start's generated keys (auth: dhchap default)
SECRETS = json.loads(Path(RUN, "auth-keys.json").read_text())
ctrl = csi_grpc.ControllerStub(grpc.insecure_channel(f"unix://{RUN}/controller.sock"))
node = csi_grpc.NodeStub(grpc.insecure_channel(f"unix://{RUN}/node.sock"))
AM = csi.VolumeCapability.AccessMode
CAP = csi.VolumeCapability(block=csi.VolumeCapability.BlockVolume(),
                           access_mode=AM(mode=AM.SINGLE_NODE_WRITER))


def emit(tag, value):
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    print(f"@@{tag} " + json.dumps({**value, "uptime": uptime}), flush=True)


def sysfs():
    """Every NVMe controller and block device the kernel has, with transport."""
    ctrls = {}
    for c in sorted(Path("/sys/class/nvme").iterdir()):
        try:
            ctrls[c.name] = {a: (c / a).read_text().strip()
                             for a in ("transport", "serial", "subsysnqn", "state")}
        except OSError:          # going away while we look
            continue
    blocks = {}
    for b in sorted(Path("/sys/block").glob("nvme*")):
        uuid = b / "uuid"
        blocks[b.name] = uuid.read_text().strip() if uuid.exists() else ""
    return {"controllers": ctrls, "blocks": blocks}


def look(tag):
    t = time.monotonic()
    info = node.NodeGetInfo(csi.NodeGetInfoRequest(), timeout=30)
    took = time.monotonic() - t
    # both CLI forms at once: each is a Python start-up, slow under TCG
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
             for cmd in (["csi-spdk", "discover", "--format", "json"], ["csi-spdk", "discover"])]
    js, table = (p.communicate(timeout=120)[0] for p in procs)
    assert [p.returncode for p in procs] == [0, 0], [p.returncode for p in procs]
    emit(tag, {"node_id": info.node_id, "segments": dict(info.accessible_topology.segments),
               "discover": json.loads(js), "table": table, "sys": sysfs(),
               "nodegetinfo_seconds": round(took, 4)})


def device(ns_uuid):
    for b in Path("/sys/block").glob("nvme*"):
        dev = Path("/dev") / b.name
        if (b / "uuid").exists() and dev.exists() and (b / "uuid").read_text().strip() == ns_uuid:
            return str(dev)
    sys.exit(f"no block device with namespace uuid {ns_uuid}")


def stage():
    node_id = node.NodeGetInfo(csi.NodeGetInfoRequest()).node_id
    vol = ctrl.CreateVolume(csi.CreateVolumeRequest(
        name="pvc-nvme-discovery", capacity_range=csi.CapacityRange(required_bytes=16 << 20),
        volume_capabilities=[CAP])).volume
    pctx = dict(ctrl.ControllerPublishVolume(csi.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id=node_id, volume_capability=CAP,
        volume_context=dict(vol.volume_context))).publish_context)
    staging = "/var/lib/kubelet/plugins/csi/nvme-discovery/staging"
    os.makedirs(staging, exist_ok=True)
    node.NodeStageVolume(csi.NodeStageVolumeRequest(
        secrets=SECRETS,
        volume_id=vol.volume_id, publish_context=pctx, staging_target_path=staging,
        volume_capability=CAP, volume_context=dict(vol.volume_context)))
    data = os.urandom(1 << 20)
    dev = device(pctx[contract.PC_NS_UUID])
    fd = os.open(dev, os.O_RDWR)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    os.close(fd)
    emit("VOLUME", {"nqn": pctx["nqn"], "dev": dev, "publish_context": pctx})
    return {"volume_id": vol.volume_id, "node_id": node_id, "staging": staging, "dev": dev,
            "data": data}


def wait_unplugged(dev_id, serial, timeout=120):
    """Ask the host to unplug, then wait until the kernel has let go of it."""
    print(f"@@UNPLUG {dev_id}", flush=True)
    deadline = time.monotonic() + timeout
    while any(c["serial"] == serial for c in sysfs()["controllers"].values()):
        if time.monotonic() > deadline:
            sys.exit(f"{serial} still in /sys/class/nvme after {timeout}s")
        time.sleep(0.2)


def verify_and_teardown(st):
    Path("/proc/sys/vm/drop_caches").write_text("3")
    fd = os.open(st["dev"], os.O_RDONLY)
    got = os.pread(fd, 1 << 20, 0)
    os.close(fd)
    assert got == st["data"], "the staged volume lost its data across the hot-unplugs"
    node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(
        volume_id=st["volume_id"], staging_target_path=st["staging"]))
    ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(
        volume_id=st["volume_id"], node_id=st["node_id"]))
    ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=st["volume_id"]))
    emit("TEARDOWN", sysfs())


st = stage()
look("all")
wait_unplugged("ssdc", "CSIC0003")
look("without-c")
wait_unplugged("ssdb", "CSIB0002")
look("without-bc")
verify_and_teardown(st)
'''

SCRIPT = r'''
. /etc/guest/lib.sh
csi_stack_start guest-node
rc=0
python3 /root/d.py || rc=$?
csi_stack_stop || rc=1
echo "--- node log (warnings and errors) ---"
grep -E '"level": "(warning|error|critical)"|Traceback' "$CSI_RUN/node.log" || true
[ "$rc" = 0 ] || csi_stack_logs 80
exit $rc
'''


def _script_seconds(output: str) -> float | None:
    start = re.search(r"^@@GUEST-START ([\d.]+)$", output, re.M)
    end = re.search(r"^@@GUEST-EXIT \d+ ([\d.]+)$", output, re.M)
    return round(float(end.group(1)) - float(start.group(1)), 2) if start and end else None


def _marker(output: str, tag: str) -> dict:
    found = re.findall(rf"^@@{re.escape(tag)} (.*)$", output, re.M)
    assert len(found) == 1, f"expected one @@{tag} line in the guest output, got {len(found)}"
    return json.loads(found[0])


def _qemu_nvme(monitor) -> dict[str, dict]:
    """QEMU's own view of its NVMe functions, by device id."""
    return {d["qdev_id"]: {"pci": f"0000:{d['bus']:02x}:{d['slot']:02x}.{d['function']}",
                           "ids": (f"{d['id']['vendor']:04x}", f"{d['id']['device']:04x}")}
            for d in monitor.pci_devices() if d.get("qdev_id", "").startswith("ssd")}


def _expect(ssds, qemu: dict[str, dict]) -> list[dict]:
    """What discover must say about ``ssds``, from the test's own parameters
    and QEMU's PCI view (never from the guest)."""
    out = []
    for s in ssds:
        assert qemu[s.id]["pci"] == s.pci_address, (qemu[s.id], s)
        assert qemu[s.id]["ids"] == IDS[s.intel_id], qemu[s.id]
        out.append({"pci_address": s.pci_address, "vendor_id": IDS[s.intel_id][0],
                    "device_id": IDS[s.intel_id][1], "serial": s.serial, "model": MODEL,
                    "capacity_bytes": sum(s.namespaces),
                    "ns": [(i, size) for i, size in enumerate(s.namespaces, 1)],
                    "class": "intel-qemu-nvme-ctrl" if s.intel_id else "qemu-nvme-ctrl"})
    return sorted(out, key=lambda e: e["pci_address"])


def _check_look(look: dict, ssds, qemu: dict, volume: dict) -> None:
    got = sorted(look["discover"], key=lambda e: e["pci_address"])
    want = _expect(ssds, qemu)
    assert [g["pci_address"] for g in got] == [w["pci_address"] for w in want], got
    # QEMU reports its own version as the firmware revision
    assert {g["firmware"] for g in got} == {qemu["version"]}, (got, qemu["version"])
    for g, w in zip(got, want, strict=True):
        assert g["owner"] == "kernel" and g["vendor"] in ("qemu", "intel"), g
        for key in ("vendor_id", "device_id", "serial", "model", "capacity_bytes", "class"):
            assert g[key] == w[key], (key, g, w)
        assert [(n["nsid"], n["size_bytes"]) for n in g["namespaces"]] == w["ns"], g
        # the namespaces discover names are the controller's disks in /sys
        ctrl = g["name"]
        assert look["sys"]["controllers"][ctrl]["transport"] == "pcie"
        assert look["sys"]["controllers"][ctrl]["serial"] == w["serial"]
        for n in g["namespaces"]:
            assert n["name"] in look["sys"]["blocks"], (n, look["sys"]["blocks"])
    # The NVMe/TCP controller the node connected is in /sys with its namespace,
    # and nowhere in discover.
    tcp = {name: c for name, c in look["sys"]["controllers"].items()
           if c["subsysnqn"] == volume["nqn"]}
    assert tcp and all(c["transport"] == "tcp" for c in tcp.values()), look["sys"]
    assert volume["dev"].removeprefix("/dev/") in look["sys"]["blocks"], look["sys"]
    listed = {g["name"] for g in got} | {n["name"] for g in got for n in g["namespaces"]}
    assert not listed & set(tcp), (listed, tcp)
    assert volume["dev"].removeprefix("/dev/") not in listed
    assert volume["nqn"] not in json.dumps(look["discover"])
    # The table shows the same SSDs, one row each, with the same facts.
    lines = look["table"].strip().splitlines()
    rows = [re.split(r"\s{2,}", line) for line in lines[1:]]
    assert len(rows) == len(want), look["table"]
    for row, w, g in zip(sorted(rows, key=lambda r: r[2]), want, got, strict=True):
        assert row[2:4] == [w["pci_address"], f"{w['vendor_id']}:{w['device_id']}"], row
        assert row[5:8] == [MODEL, w["serial"], g["firmware"]], row
        assert row[9] == ",".join(n["name"] for n in g["namespaces"]) and row[10] == w["class"]
    # One label per SSD class present, nothing else but the node key.
    classes = {"ssd.csi-spdk.io/" + w["class"] for w in want}
    assert look["segments"] == {"topology.csi-spdk.io/node": "guest-node",
                                **{c: "true" for c in classes}}, look["segments"]


def test_guest_nvme_discovery_and_hot_unplug(guest_ready, request):
    opts = GuestOptions(nvme=SSDS, monitor=True)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    handle = start_guest(SCRIPT, timeout=400, files={"/root/d.py": DRIVER}, options=opts)
    with handle:
        try:
            qemu = {}
            for dev_id, left in (("ssdc", SSDS[:2]), ("ssdb", SSDS[:1])):
                assert handle.wait_for_output(f"@@UNPLUG {dev_id}\n", 300), handle.describe()
                if not qemu:
                    qemu = _qemu_nvme(handle.monitor())
                    assert sorted(qemu) == ["ssda", "ssdb", "ssdc"], qemu
                    v = handle.monitor().cmd("query-version")["qemu"]
                    qemu["version"] = f"{v['major']}.{v['minor']}.{v['micro']}"
                handle.monitor().device_del(dev_id)
                assert sorted(_qemu_nvme(handle.monitor())) == sorted(c.id for c in left)
            rc = handle.wait(300)
            timings["guest_script"] = _script_seconds(handle.output())
            output = handle.output()
        finally:
            timings["total"] = round(time.monotonic() - t0, 2)
            described = handle.describe(60)
            request.node.add_report_section("call", "guest output", described)
            request.node.add_report_section("call", "guest timings", json.dumps(timings))
    assert rc == 0, described
    volume = _marker(output, "VOLUME")
    all3, without_c, without_bc = (_marker(output, t) for t in ("all", "without-c",
                                                                "without-bc"))
    _check_look(all3, SSDS, qemu, volume)
    assert {QEMU_CLASS, INTEL_CLASS} <= set(all3["segments"])   # 3 SSDs, 2 classes
    _check_look(without_c, SSDS[:2], qemu, volume)
    assert INTEL_CLASS not in without_c["segments"]
    _check_look(without_bc, SSDS[:1], qemu, volume)
    assert QEMU_CLASS in without_bc["segments"]                 # A is still there
    teardown = _marker(output, "TEARDOWN")
    assert not [c for c in teardown["controllers"].values() if c["transport"] == "tcp"]
    log = output.split("--- node log (warnings and errors) ---", 1)[1]
    log = log[:log.rfind("\n@@GUEST-EXIT")]
    assert not log.strip(), f"the node plugin logged warnings or errors:\n{log}"
    for name, look in (("all", all3), ("without-c", without_c), ("without-bc", without_bc)):
        print(f"NodeGetInfo ({name}): {look['nodegetinfo_seconds'] * 1000:.1f} ms in the guest")
    steps = [("volume", volume), ("all", all3), ("without-c", without_c),
             ("without-bc", without_bc)]
    print("guest uptime at each step:", {n: v["uptime"] for n, v in steps})
    print(f"guest timings: {timings}")
