"""SPDK v25.09's ``bdev_set_qos_limit`` contract, as the driver relies on it.

Expected answers come from spdk-golden/08_qos_iostat.json where it covers a
case and otherwise from v25.09's source (lib/bdev/bdev_rpc.c
``rpc_bdev_set_qos_limit``, lib/bdev/bdev.c ``spdk_bdev_set_qos_rate_limits``,
``bdev_start_qos``, ``bdev_close``/``bdev_qos_destroy``; see sim/qos.py). Every
test runs against the simulator and, with CSI_SPDK_TEST_RPC, unchanged against
a real spdk_tgt (unique names, cleaned up), so a real target checks the
simulator's model.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest

from csi_spdk.spdk.client import SpdkClient
from csi_spdk.spdk.errors import SpdkError

pytestmark = pytest.mark.real_spdk

UINT64_MAX = 2**64 - 1
EAGAIN = (-32602, "Failed to configure rate limit: Resource temporarily unavailable")
DECODE = (-32603, "spdk_json_decode_object failed")
OFF = {"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0,
       "w_mbytes_per_sec": 0}


class Lvol:
    def __init__(self, c: SpdkClient) -> None:
        tag = uuid.uuid4().hex[:8]
        self.c, self.malloc, self.lvs = c, f"Mq{tag}", f"lvsq{tag}"
        self.nqn = f"nqn.2016-06.io.spdk:qos{tag}"
        c.call("bdev_malloc_create", {"name": self.malloc, "num_blocks": 16384,
                                      "block_size": 4096})
        c.call("bdev_lvol_create_lvstore", {"bdev_name": self.malloc, "lvs_name": self.lvs})
        self.uuid = c.call("bdev_lvol_create", {"lvs_name": self.lvs, "lvol_name": "v",
                                                "size_in_mib": 8, "thin_provision": True})

    def qos(self, **limits) -> bool:
        return self.c.call("bdev_set_qos_limit", {"name": self.uuid, **limits})

    def fails(self, params: dict) -> tuple[int, str]:
        with pytest.raises(SpdkError) as err:
            self.c.call("bdev_set_qos_limit", params)
        return err.value.spdk_code, err.value.spdk_message

    def limits(self) -> dict:
        return self.c.call("bdev_get_bdevs", {"name": self.uuid})[0]["assigned_rate_limits"]

    def export(self) -> None:
        """An nvmf namespace: a consumer that holds the bdev open with a channel."""
        self.c.call("nvmf_create_subsystem", {"nqn": self.nqn, "allow_any_host": False})
        self.c.call("nvmf_subsystem_add_ns", {"nqn": self.nqn,
                                              "namespace": {"bdev_name": self.uuid}})

    def unexport(self) -> None:
        self.c.call("nvmf_delete_subsystem", {"nqn": self.nqn})

    def close(self) -> None:
        for method, params in (("nvmf_delete_subsystem", {"nqn": self.nqn}),
                               ("bdev_lvol_delete", {"name": self.uuid}),
                               ("bdev_lvol_delete_lvstore", {"lvs_name": self.lvs}),
                               ("bdev_malloc_delete", {"name": self.malloc})):
            with contextlib.suppress(SpdkError):
                self.c.call(method, params)


@pytest.fixture
def lv(spdk_rpc: str) -> Iterator[Lvol]:
    with SpdkClient(spdk_rpc, timeout=30) as c:
        v = Lvol(c)
        try:
            yield v
        finally:
            v.close()


def test_unopened_bdev_takes_one_change_then_eagain(lv):
    assert lv.limits() == OFF
    assert lv.qos(rw_ios_per_sec=10000, rw_mbytes_per_sec=100) is True
    assert lv.fails({"name": lv.uuid, "r_mbytes_per_sec": 50}) == EAGAIN
    assert lv.fails({"name": lv.uuid, "rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0}) == EAGAIN
    assert lv.limits() == {**OFF, "rw_ios_per_sec": 10000, "rw_mbytes_per_sec": 100}


def test_all_zero_on_a_bdev_without_qos_is_a_no_op_that_can_repeat(lv):
    assert lv.qos(rw_ios_per_sec=0) is True
    assert lv.qos(rw_ios_per_sec=0, w_mbytes_per_sec=0) is True
    assert lv.qos(w_mbytes_per_sec=3) is True            # still the first real change
    assert lv.limits() == {**OFF, "w_mbytes_per_sec": 3}


def test_argument_errors(lv):
    assert lv.fails({"name": lv.uuid}) == (-22, "No rate limits specified")
    # UINT64_MAX is SPDK's "not given"
    assert lv.fails({"name": lv.uuid, "rw_ios_per_sec": UINT64_MAX}) == \
        (-22, "No rate limits specified")
    assert lv.fails({"name": "nope", "rw_ios_per_sec": 1000}) == (-19, "No such device")
    assert lv.fails({"name": "nope"}) == (-19, "No such device")
    for bad in (-1, 2**64, 1.5, "1000", True, None):
        assert lv.fails({"name": lv.uuid, "rw_ios_per_sec": bad}) == DECODE, bad
    assert lv.fails({"name": lv.uuid, "iops": 1000}) == DECODE
    assert lv.fails({"rw_ios_per_sec": 1000}) == DECODE
    assert lv.limits() == OFF


def test_exported_bdev_updates_round_and_clamp(lv):
    lv.export()
    assert lv.qos(rw_ios_per_sec=1500) is True
    assert lv.limits()["rw_ios_per_sec"] == 2000
    lv.qos(rw_ios_per_sec=500)
    assert lv.limits()["rw_ios_per_sec"] == 1000
    lv.qos(rw_ios_per_sec=1)
    assert lv.limits()["rw_ios_per_sec"] == 1000
    lv.qos(rw_ios_per_sec=3000)
    assert lv.limits()["rw_ios_per_sec"] == 3000
    # MiB/s above UINT64_MAX / 2**20 are clamped to it
    lv.qos(r_mbytes_per_sec=UINT64_MAX - 1)
    assert lv.limits()["r_mbytes_per_sec"] == UINT64_MAX // 2**20
    # the IOPS round-up is uint64 arithmetic: it wraps (C semantics)
    lv.qos(rw_ios_per_sec=UINT64_MAX - 614)
    assert lv.limits()["rw_ios_per_sec"] == (UINT64_MAX - 614 + 999) % 2**64 == 384


def test_zero_turns_off_one_limit_all_zero_disables(lv):
    lv.export()
    lv.qos(rw_ios_per_sec=2000, rw_mbytes_per_sec=100, r_mbytes_per_sec=50,
           w_mbytes_per_sec=20)
    lv.qos(rw_mbytes_per_sec=0)
    assert lv.limits() == {"rw_ios_per_sec": 2000, "rw_mbytes_per_sec": 0,
                           "r_mbytes_per_sec": 50, "w_mbytes_per_sec": 20}
    lv.qos(rw_ios_per_sec=0, r_mbytes_per_sec=0, w_mbytes_per_sec=0)
    assert lv.limits() == OFF
    # disabled means the QoS structure is gone: after the consumer closes, the
    # unopened bdev takes a first change again
    lv.unexport()
    assert lv.qos(rw_ios_per_sec=4000) is True
    assert lv.fails({"name": lv.uuid, "rw_ios_per_sec": 5000}) == EAGAIN
    assert lv.limits() == {**OFF, "rw_ios_per_sec": 4000}


def test_limits_survive_the_consumer_closing_then_eagain(lv):
    lv.export()
    lv.qos(rw_ios_per_sec=3000, w_mbytes_per_sec=7)
    lv.unexport()
    assert lv.limits() == {**OFF, "rw_ios_per_sec": 3000, "w_mbytes_per_sec": 7}
    assert lv.fails({"name": lv.uuid, "rw_ios_per_sec": 4000}) == EAGAIN
    lv.export()                                 # opened again: changes work again
    lv.qos(rw_ios_per_sec=4000)
    assert lv.limits() == {**OFF, "rw_ios_per_sec": 4000, "w_mbytes_per_sec": 7}


def test_alias_names_the_same_bdev(lv):
    assert lv.c.call("bdev_set_qos_limit", {"name": f"{lv.lvs}/v",
                                            "w_mbytes_per_sec": 2}) is True
    assert lv.limits()["w_mbytes_per_sec"] == 2
