"""node/luks.py against a fake cryptsetup that keeps LUKS headers and mappings
in memory: the key only ever on stdin, format only on a device with nothing
on it, a wrong key refused with the header untouched, idempotent open/close.
(The real cryptsetup and dm-crypt run in the guest: tests/e2e/test_guest_encryption.py.)"""

from __future__ import annotations

import subprocess

import pytest

from csi_spdk.errors import FailedPrecondition
from csi_spdk.node import luks
from csi_spdk.node.mount import Probe

KEY = "ab" * 32 + "cd" * 32
OTHER = "12" * 32 + "34" * 32


class FakeCryptsetup:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}      # device -> passphrase
        self.signatures: dict[str, Probe] = {}
        self.mappings: dict[str, str] = {}     # name -> device
        self.calls: list[tuple[list[str], str]] = []
        self.devnos: dict[str, str] = {}       # device -> "major:minor"
        self.volume_key = "ee" * 64            # what dm-crypt's table holds
        self.inactive: dict[str, str] = {}     # name -> loaded, not yet resumed table

    def devno(self, device: str) -> str:
        return self.devnos.setdefault(device, f"259:{len(self.devnos)}")

    def _dmsetup(self, argv, table) -> subprocess.CompletedProcess:
        op, name = argv[1], argv[-1]
        rc, out = 0, ""
        if name not in self.mappings:
            rc = 1
        elif op == "table":
            out = f"0 2048 crypt aes-xts-plain64 {self.volume_key} 0 " \
                  f"{self.devno(self.mappings[name])} 32768 1 allow_discards\n"
        elif op == "reload":
            self.inactive[name] = table
        elif op == "resume" and name in self.inactive:
            fields = self.inactive.pop(name).split()
            assert fields[4] == self.volume_key      # the key the mapping had
            by_devno = {v: k for k, v in self.devnos.items()}
            self.mappings[name] = by_devno[fields[6]]
        return subprocess.CompletedProcess(argv, rc, out, "")

    def probe(self, device: str) -> Probe:
        if device in self.headers:
            return Probe("crypto_LUKS", "crypto")
        return self.signatures.get(device, Probe())

    def run(self, argv, input="", **kw) -> subprocess.CompletedProcess:
        self.calls.append((list(argv), input))
        if argv[0] == "dmsetup":
            return self._dmsetup(argv, input)
        assert argv[0] == "cryptsetup"
        op = argv[1]
        rc, out = 0, ""
        if op == "status":
            name = argv[2]
            if name in self.mappings:
                out = f"/dev/mapper/{name} is active.\n  type:    LUKS2\n" \
                      f"  device:  {self.mappings[name]}\n"
            else:
                rc = 4
        elif op == "luksFormat":
            self.headers[argv[-3]] = input
        elif op == "open":
            device, name = argv[-4], argv[-3]
            if self.headers.get(device) != input:
                rc = 2
            elif name in self.mappings:
                rc = 5
            else:
                self.mappings[name] = device
        elif op == "close":
            self.mappings.pop(argv[2], None)
        return subprocess.CompletedProcess(argv, rc, out, "")


@pytest.fixture
def fake():
    return FakeCryptsetup()


def _luks(fake) -> luks.Luks:
    return luks.Luks(fake.probe, run=fake.run, devno=fake.devno)


def test_formats_an_empty_device_once_and_never_puts_the_key_in_argv(fake):
    lk = _luks(fake)
    name = luks.mapper_name("target-a:vol1")
    assert lk.open("/dev/nvme0n1", name, KEY) == f"/dev/mapper/{name}"
    assert fake.headers == {"/dev/nvme0n1": KEY}
    assert fake.mappings == {name: "/dev/nvme0n1"}
    assert lk.open("/dev/nvme0n1", name, KEY) == f"/dev/mapper/{name}"   # idempotent
    lk.close(name)
    lk.open("/dev/nvme0n1", name, KEY)    # reopen: no second format
    assert [c[0][1] for c in fake.calls].count("luksFormat") == 1
    for argv, stdin in fake.calls:
        assert not any(KEY[:16] in a for a in argv)
        if argv[1] in ("luksFormat", "open"):
            assert argv[-2:] == ["--key-file", "-"] and stdin == KEY
    opened = [a for a, _ in fake.calls if a[1] == "open"]
    assert all("--disable-keyring" in a for a in opened)


def test_a_wrong_key_is_refused_and_the_header_kept(fake):
    lk = _luks(fake)
    lk.open("/dev/nvme0n1", "m1", KEY)
    lk.close("m1")
    with pytest.raises(FailedPrecondition) as err:
        lk.open("/dev/nvme0n1", "m1", OTHER)
    assert "does not open the LUKS2 header" in err.value.message
    assert OTHER not in err.value.message and KEY not in err.value.message
    assert fake.headers == {"/dev/nvme0n1": KEY} and fake.mappings == {}


@pytest.mark.parametrize("found", [Probe("ext4", "filesystem"), Probe(pttype="gpt"),
                                   Probe("LVM2_member", "raid")])
def test_anything_else_on_the_device_is_never_formatted(fake, found):
    fake.signatures["/dev/nvme0n1"] = found
    with pytest.raises(FailedPrecondition) as err:
        _luks(fake).open("/dev/nvme0n1", "m1", KEY)
    assert "refusing to format" in err.value.message
    assert fake.headers == {} and not [c for c in fake.calls if c[0][1] == "luksFormat"]


def test_read_only_never_formats(fake):
    with pytest.raises(FailedPrecondition):
        _luks(fake).open("/dev/nvme0n1", "m1", KEY, readonly=True)
    assert fake.headers == {}


def test_a_mapping_over_a_replaced_device_is_reopened(fake):
    lk = _luks(fake)
    lk.open("/dev/nvme0n1", "m1", KEY)
    fake.headers["/dev/nvme1n1"] = KEY     # the same namespace, reconnected
    lk.open("/dev/nvme1n1", "m1", KEY)
    assert fake.mappings == {"m1": "/dev/nvme1n1"}


def test_key_from_secrets(fake):
    assert luks.key_from_secrets({"encryptionKey": KEY.upper()}) == KEY
    for bad in ({}, {"encryptionKey": "abc"}):
        with pytest.raises(FailedPrecondition) as err:
            luks.key_from_secrets(bad)
        assert "encryptionKey" in err.value.message


def test_repoint_reloads_the_table_onto_the_reconnected_device_without_a_passphrase(fake):
    lk = _luks(fake)
    name = luks.mapper_name("target-a:vol1")
    lk.open("/dev/nvme0n1", name, KEY)
    fake.headers["/dev/nvme1n1"] = KEY        # the same namespace, reconnected
    fake.calls.clear()
    assert lk.repoint(name, "/dev/nvme1n1") is True
    assert fake.mappings[name] == "/dev/nvme1n1"
    assert [c[0][:2] for c in fake.calls] == [["dmsetup", "table"], ["dmsetup", "reload"],
                                              ["dmsetup", "resume"]]
    for argv, _ in fake.calls:                 # neither key in argv; no passphrase used
        assert fake.volume_key not in " ".join(argv) and KEY not in " ".join(argv)
    assert all(KEY not in stdin for _, stdin in fake.calls)
    fake.calls.clear()
    assert lk.repoint(name, "/dev/nvme1n1") is True      # already there: only read
    assert [c[0][1] for c in fake.calls] == ["table"]
    lk.close(name)
    assert lk.repoint(name, "/dev/nvme1n1") is False     # nothing open: restage


def test_a_failed_reload_never_echoes_the_key(fake):
    lk = _luks(fake)
    name = luks.mapper_name("target-a:vol1")
    lk.open("/dev/nvme0n1", name, KEY)
    real = fake.run

    def loud(argv, input="", **kw):
        if argv[:2] == ["dmsetup", "reload"]:
            return subprocess.CompletedProcess(argv, 1, "", f"bad table: {input}")
        return real(argv, input=input, **kw)

    lk._run = loud
    with pytest.raises(Exception) as err:
        lk.repoint(name, "/dev/nvme1n1")
    assert "dmsetup reload" in str(err.value) and fake.volume_key not in str(err.value)
    assert fake.mappings[name] == "/dev/nvme0n1"
