"""The byte-budget LRU behind the host and disk tiers: order, sizes, budget, eviction by predicate."""

from __future__ import annotations

from engine.byte_lru import ByteLRU


def filled(budget: int, sizes: dict[str, int]) -> ByteLRU[str, str]:
    lru: ByteLRU[str, str] = ByteLRU(budget)
    for key, nbytes in sizes.items():
        lru.put(key, f"value-{key}", nbytes)
    return lru


def test_put_get_pop_and_totals():
    lru = filled(100, {"a": 10, "b": 20})
    assert len(lru) == 2 and lru.nbytes == 30 and lru.mean_nbytes == 15
    assert "a" in lru and lru.get("a") == "value-a" and lru.get("z") is None
    lru.put("a", "new-a", 40)  # replacing counts only the new size
    assert lru.nbytes == 60 and lru.get("a") == "new-a" and lru.keys() == ["b", "a"]
    assert lru.pop("b") == ("value-b", 20) and lru.pop("b") is None
    assert lru.nbytes == 40 and lru.keys() == ["a"]
    assert ByteLRU(1).mean_nbytes == 0.0


def test_touch_orders_least_recently_used_first():
    lru = filled(100, {"a": 1, "b": 1, "c": 1})
    lru.touch("a")
    lru.touch("missing")  # no effect
    assert lru.keys() == ["b", "c", "a"]


def test_evict_oldest_first_until_within_budget():
    lru = filled(50, {"a": 20, "b": 20, "c": 20, "d": 20})
    assert lru.over_budget
    evicted = lru.evict(lambda key: True)
    assert [key for key, _, _ in evicted] == ["a", "b"] and evicted[0] == ("a", "value-a", 20)
    assert not lru.over_budget and lru.nbytes == 40 and lru.keys() == ["c", "d"]
    assert lru.evict(lambda key: True) == []  # within budget: nothing leaves


def test_evict_skips_what_the_owner_keeps_and_may_stay_over():
    lru = filled(30, {"a": 20, "b": 20, "c": 20})
    assert [key for key, _, _ in lru.evict(lambda key: key != "a")] == ["b", "c"]
    assert lru.keys() == ["a"] and not lru.over_budget
    lru = filled(10, {"a": 20, "b": 20})
    assert lru.evict(lambda key: False) == [] and lru.over_budget and lru.nbytes == 40
