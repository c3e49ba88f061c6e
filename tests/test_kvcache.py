"""mor.kvcache: KV storage allocates what it holds (issue #16), and reads back what was written."""

from __future__ import annotations

import torch
from test_engine import run_engine, workload
from test_model import make_model, small_config

from mor.kvcache import KVCache, KVPool, PackedSite


def test_kv_cache_holds_packed_valid_entries_only() -> None:
    """Between forwards every site is packed: keys/values of valid entries only (left padding
    and tokens a router did not send to a recursion take no space), plus index tensors."""
    cfg = small_config("middle_cycle", "expert_choice", "recursion_wise", num_recursions=3,
                       num_layers=5)  # fmt: skip
    model = make_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 12))
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # a left-padded row
    cache = KVCache()
    with torch.no_grad():
        model(x, mask, cache=cache)
        for _ in range(3):
            model(x[:, :1], cache=cache)
    assert all(isinstance(s, PackedSite) for s in cache.sites.values())
    per_entry = 2 * cfg.num_kv_heads * cfg.head_dim * 8  # float64 keys and values
    valid = sum(s.num_valid() for s in cache.sites.values())
    assert cache.num_bytes() == per_entry * valid
    index = sum(16 * s.num_valid() + 8 * 3 for s in cache.sites.values())  # pos, row; counts
    assert cache.num_bytes(valid_only=False) == per_entry * valid + index
    deep = cache.sites[("rec", 2, 0)]
    assert deep.num_valid() < cache.sites[("rec", 0, 0)].num_valid() < 3 * 15
    # Expanding and packing again keeps exactly the same entries.
    again = PackedSite.pack(deep.dense())
    for a, b in zip((deep.k, deep.v, deep.pos, deep.row, deep.counts), (again.k, again.v,
                    again.pos, again.row, again.counts)):  # fmt: skip
        assert torch.equal(a, b)


def test_kv_pool_takes_entries_on_demand_and_reuses_freed_ones() -> None:
    pool = KVPool(layers=2, streams=2, slots=3, max_len=6, heads=1, head_dim=2,
                  dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
    assert pool.capacity == 0 and pool.allocated_bytes() == pool.index_bytes()
    slots = torch.tensor([0, 1, 2])
    for t in range(4):
        ids = pool.append(torch.zeros(3, dtype=torch.long), slots)
        pool.write(1, ids, torch.full((3, 1, 2), float(t)), torch.zeros(3, 1, 2))
    assert pool.n[0].tolist() == [4, 4, 4] and pool.n[1].tolist() == [0, 0, 0]
    assert 12 <= pool.capacity <= 12 * 1.0625 + 1
    idx, mask = pool.index(torch.tensor([0, 0]), torch.tensor([2, 0]))
    keys, _ = pool.read(1, idx)
    assert mask.all() and keys[:, 0, :, 0].tolist() == [[0, 1, 2, 3]] * 2
    cap = pool.capacity
    pool.release(1)
    assert pool.n[:, 1].tolist() == [0, 0] and pool.top == 4
    # One entry per (stream, slot) per call: the freed entries are taken again, no growth.
    pool.append(torch.tensor([1, 1, 1, 0]), torch.tensor([0, 1, 2, 1]))
    assert pool.capacity == cap and pool.peak_used == 12
    one, zero = torch.tensor([0]), torch.tensor([0])
    pool.append(one, zero)
    pool.append(one, zero)  # slot 0 at stream 0 now holds max_len = 6 entries
    try:
        pool.append(one, zero)
    except RuntimeError as err:
        assert "max_len" in str(err)
    else:
        raise AssertionError("append beyond max_len should fail")


def test_engine_allocates_within_ten_percent_of_what_it_holds() -> None:
    """The engine's pools hold entries a sequence cached (not max_len per site and slot), give
    them back when it finishes, and their capacity stays within 10% of the peak in use."""
    cfg = small_config("middle_cycle", "expert_choice", "recursion_wise", num_recursions=3,
                       num_layers=5)  # fmt: skip
    model = make_model(cfg, seed=3)
    prompts, news = workload(cfg.vocab_size, n=6, seed=1)
    eng, _, _ = run_engine(model, prompts, news, max_slots=3, max_len=40)
    for pool in (eng.outer, eng.rec):
        assert pool.top == pool.capacity and int(pool.n.sum()) == 0  # all released
        assert pool.capacity <= 1.1 * pool.peak_used
    # Recursion-wise: the deepest recursion's entries are fewer, and the pools' capacity is
    # far below the old preallocation (every site × slot × max_len).
    tables = eng.outer.index_bytes() + eng.rec.index_bytes()
    assert eng.kv_allocated_bytes() - tables <= 1.1 * eng.kv_bytes(peak=True)
    dense = 2 * (2 + 3) * 3 * 40 * cfg.num_kv_heads * cfg.head_dim * 8
    assert eng.kv_allocated_bytes() < 0.5 * dense
