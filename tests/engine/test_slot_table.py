"""The device slot table: assignment, versions, pins, and which slot gives way."""

from __future__ import annotations

from engine.slot_table import SlotTable


def test_empty_slots_first_then_least_recently_used_unpinned():
    table = SlotTable(2)
    assert table.take(lambda key: False) == (0, None)
    table.assign(0, "a", generation=1)
    table.pin(0)
    assert table.take(lambda key: False) == (1, None)
    table.assign(1, "b", generation=2)
    table.pin(1)
    assert table.take(lambda key: False) is None  # every slot pinned
    assert table.num_used == 2 and table.num_pinned == 2
    assert table.unpin("a") and table.unpin("b")
    table.pin(0)  # a used last: b is the least recently used
    assert table.unpin("a")
    assert table.take(lambda key: False) == (1, "b")
    assert table.find("b") is None and table.num_used == 1


def test_adapters_requests_wait_for_are_given_up_last():
    table = SlotTable(2)
    for slot, key in enumerate("ab"):
        table.assign(slot, key, generation=slot + 1)
        table.pin(slot)
        table.unpin(key)
    # a is the least recently used, but a request waits for it: b goes
    assert table.take(lambda key: key == "a") == (1, "b")


def test_versions_and_pins():
    table = SlotTable(1)
    table.assign(0, "a", generation=3)
    assert table.find("a") == 0 and table.generation(0) == 3
    assert table.holds("a", 3) and not table.holds("a", 4) and not table.holds("b", 3)
    assert not table.unpin("a") and not table.unpin("b")  # nothing pinned: the caller's bug
    table.pin(0)
    table.pin(0)
    assert table.is_pinned(0) and table.unpin("a") and table.is_pinned(0) and table.unpin("a")
    assert not table.is_pinned(0)
    table.assign(0, "a", generation=4)  # an unpinned older version is reloaded in place
    assert table.holds("a", 4) and table.find("a") == 0
