"""HAStorage against SGLang 0.5.23's real host pools: MHA and MLA, layouts page_first, layer_first and
page_first_direct, bf16 and fp8. Every page loads back byte for byte through v1 and through the legacy
path SGLang's controller uses without ``interface_v1``; the two paths share one page format."""

import time

import numpy as np
import pytest
import torch

from tests.helpers import GATE
from tests.sglang.conftest import build
from tests.sglang.realpools import DTYPES, LAYOUTS, fill, mha_pool, mla_pool, pages_at

POOLS = {"mha": mha_pool, "mla": mla_pool}
CASES = [(kind, layout, dtype) for kind in POOLS for layout in LAYOUTS for dtype in DTYPES]
IDS = [f"{k}-{l}-{str(d).removeprefix('torch.')}" for k, l, d in CASES]


def members(kind, tmp_path, request):
    return {
        "file": {"name": "m", "type": "file", "path": str(tmp_path / "pages")},
        "memory": {"name": "m", "type": "memory"},
        "redis": {"name": "m", "type": "redis", "url": request.getfixturevalue("redis_server").url}
        if kind == "redis" else None,
        "sglang-file": {"name": "m", "type": "sglang", "backend": "file",
                        "extra_config": {"file_storage_path": str(tmp_path / "sg")}},
    }[kind]


@pytest.mark.parametrize("kind,layout,dtype", CASES, ids=IDS)
def test_v1_round_trip_is_byte_exact_on_every_real_pool(kind, layout, dtype, tmp_path):
    pool = POOLS[kind](layout, dtype)
    s = build({"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}, pool=pool, mla=kind == "mla")
    written = pool.alloc(4 * pool.page_size)
    expected = fill(pool, written, seed=7)
    keys = [f"page-{i}" for i in range(4)]
    assert s.batch_set_v1(keys, written) == [True] * 4
    target = pool.alloc(5 * pool.page_size)
    assert s.batch_get_v1(keys + ["absent"], target) == [True] * 4 + [False]
    assert pages_at(pool, target)[:4] == expected
    status = s.ha_status()["pools"]["kv"]
    assert status["in_place"] == (layout != "layer_first")  # page_first layouts: no copy of our own
    assert status["dtype"] == ("uint8" if dtype is torch.float8_e4m3fn else "bfloat16")


@pytest.mark.parametrize("kind,layout,dtype", CASES, ids=IDS)
def test_the_legacy_path_loads_the_same_pages_as_sglangs_controller_uses_it(kind, layout, dtype, tmp_path):
    """interface_v1 off: the controller hands flat pages to batch_set, and dummy pages to batch_get, then
    passes what batch_get returns straight to set_from_flat_data_page."""
    pool = POOLS[kind](layout, dtype)
    s = build({"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}, pool=pool, mla=kind == "mla")
    written = pool.alloc(3 * pool.page_size)
    expected = fill(pool, written, seed=3)
    keys = ["a", "b", "c"]
    ps = pool.page_size
    assert s.batch_set(keys, [pool.get_data_page(written[i * ps]) for i in range(3)]) is True
    got = s.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    target = pool.alloc(3 * ps)
    for i, page in enumerate(got):
        pool.set_from_flat_data_page(target[i * ps], page)
    assert pages_at(pool, target) == expected
    # One page format: what the legacy path stored, v1 loads, and the other way round.
    again = pool.alloc(3 * ps)
    assert s.batch_get_v1(keys, again) == [True] * 3 and pages_at(pool, again) == expected


@pytest.mark.parametrize("member", ["memory", "redis", "sglang-file"])
def test_v1_round_trip_through_every_member_kind(member, tmp_path, request):
    pool = mha_pool("page_first", torch.bfloat16)
    s = build({"backends": [members(member, tmp_path, request)]}, pool=pool)
    written = pool.alloc(3 * pool.page_size)
    expected = fill(pool, written, seed=11)
    assert s.batch_set_v1(["x", "y", "z"], written) == [True] * 3
    target = pool.alloc(3 * pool.page_size)
    assert s.batch_get_v1(["x", "y", "z"], target) == [True] * 3
    assert pages_at(pool, target) == expected


def test_pages_are_stored_straight_from_host_memory_where_the_pool_allows_it(tmp_path):
    pool = mha_pool("page_first", torch.bfloat16)
    s = build({"backends": [{"name": "m", "type": "memory"}]}, pool=pool)
    slots = pool.alloc(2 * pool.page_size)
    kv = s.pools["kv"]
    pieces = kv.pages(slots, kv.slots(slots, 2))
    memory = pool.kv_buffer.view(torch.uint8).reshape(-1).numpy()
    assert all(len(p) == 2 and all(np.shares_memory(piece, memory) for piece in p) for p in pieces)  # K and V


def test_an_abandoned_v1_read_never_touches_the_real_host_pool(fast_deadlines):
    pool = mla_pool("page_first", torch.bfloat16)
    s = build({"backends": [{"name": "g", "type": GATE}], "deadlines_ms": fast_deadlines}, pool=pool)
    written = pool.alloc(2 * pool.page_size)
    fill(pool, written, seed=5)
    assert s.batch_set_v1(["a", "b"], written) == [True, True]
    target = pool.alloc(2 * pool.page_size)
    before = pool.kv_buffer.clone()
    gate = s.manager.members["g"].backend
    gate.close_gate()
    t0 = time.perf_counter()
    assert s.batch_get_v1(["a", "b"], target) == [False, False]
    assert time.perf_counter() - t0 < 0.5
    gate.open_gate()  # the abandoned read now completes on its worker
    assert s.manager.members["g"].bulkhead.wait_idle(5)
    time.sleep(0.05)
    assert torch.equal(pool.kv_buffer, before)


def test_mla_pages_are_written_by_the_writer_and_read_by_every_tp_rank(tmp_path):
    shared = {"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}
    pools = [mla_pool("page_first", torch.bfloat16) for _ in range(2)]
    writer, reader = (build(shared, tp_rank=r, tp_size=2, mla=True, pool=pools[r]) for r in range(2))
    slots = [p.alloc(2 * p.page_size) for p in pools]
    expected = fill(pools[0], slots[0], seed=1)
    fill(pools[1], slots[1], seed=2)
    assert reader.batch_set_v1(["from-reader"], slots[1][: pools[1].page_size]) == [True]  # not its to write
    assert writer.batch_exists(["from-reader"]) == 0
    assert writer.batch_set_v1(["p0", "p1"], slots[0]) == [True, True]
    target = pools[1].alloc(2 * pools[1].page_size)
    assert reader.batch_get_v1(["p0", "p1"], target) == [True, True]
    assert pages_at(pools[1], target) == expected


def test_a_page_is_never_served_to_another_layout_or_dtype(tmp_path):
    shared = {"backends": [{"name": "f", "type": "file", "path": str(tmp_path)}]}
    src = mha_pool("page_first", torch.bfloat16)
    s = build(shared, pool=src)
    fill(src, written := src.alloc(src.page_size), seed=9)
    assert s.batch_set_v1(["k"], written) == [True]
    for other in (mha_pool("layer_first", torch.bfloat16), mha_pool("page_first_direct", torch.bfloat16),
                  mha_pool("page_first", torch.float16), mha_pool("page_first", torch.float8_e4m3fn)):
        reader = build(shared, pool=other)
        assert reader.batch_exists(["k"]) == 0
        assert reader.batch_get_v1(["k"], other.alloc(other.page_size)) == [False]


def test_v1_with_host_indices_that_do_not_match_the_keys_fails_without_touching_anything(tmp_path):
    pool = mha_pool()
    s = build({"backends": [{"name": "m", "type": "memory"}]}, pool=pool)
    short = pool.alloc(pool.page_size)
    assert s.batch_set_v1(["a", "b"], short) == [False, False]
    assert s.batch_get_v1(["a", "b"], short) == [False, False]
