"""Adapter sources (local root, hub stand-in) and the tiered store: LRU, budgets, pins, prefetch
dedupe and leases, remembered failures, reload of changed files."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

import engine.adapter_store as adapter_store
from engine.adapter_source import HubSource, LocalSource
from engine.adapter_store import AdapterStore
from engine.config import EngineConfig
from engine.lora_slots import LoraSlots
from engine.model_loader import ModelSpec
from engine.request import AdapterRef, EngineError, ErrorType
from tests.builders import hub_cache_standin, make_adapter

SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}
SPEC = ModelSpec("llama", 2, 64, SHAPES, "tiny")


def adapter_bytes(r=8, targets=("q_proj", "v_proj")) -> int:
    """Host bytes of one make_adapter(SPEC, ...) adapter (fp32)."""
    return SPEC.num_layers * sum((SHAPES[m][0] + SHAPES[m][1]) * r * 4 for m in targets)


def wait_ready(store: AdapterStore, ref: AdapterRef, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = store.poll(ref)
        if state != "loading":
            return state
        time.sleep(0.005)
    raise AssertionError(f"{ref.key} still loading")


def make_store(root: Path, slots=2, sources=None, on_settled=None, **cfg) -> AdapterStore:
    config = EngineConfig(adapter_root=str(root), adapter_slots=slots, max_lora_rank=8, **cfg)
    return AdapterStore(config, SPEC, LoraSlots(SPEC, slots, 8, "cpu", torch.float32), sources=sources,
                        on_settled=on_settled)


class Counting(LocalSource):
    """A LocalSource that counts fetches and can be slowed down."""

    def __init__(self, root, delay=0.0):
        super().__init__(root)
        self.delay, self.fetches, self.lock = delay, {}, threading.Lock()

    def fetch(self, adapter_id, api_token):
        with self.lock:
            self.fetches[adapter_id] = self.fetches.get(adapter_id, 0) + 1
        time.sleep(self.delay)
        return super().fetch(adapter_id, api_token)


# ---- sources ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "/etc", "/abs/a", "../x", "a/../../x", "a/..", "..", "a\\b", "a\x00b",
                                 "C:x", "~root"])
def test_local_source_rejects_hostile_ids(tmp_path, bad):
    make_adapter(SPEC, tmp_path / "root" / "a")
    with pytest.raises(EngineError) as e:
        LocalSource(tmp_path / "root").fetch(bad, None)
    assert e.value.type in (ErrorType.VALIDATION, ErrorType.ADAPTER_NOT_FOUND) and not e.value.retryable


def test_local_source_paths_and_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    make_adapter(SPEC, root / "acme" / "bot")
    make_adapter(SPEC, outside / "secret")
    src = LocalSource(root)
    assert src.fetch("acme/bot", None) == (root / "acme" / "bot").resolve()
    assert src.fetch("./acme/bot", None) == (root / "acme" / "bot").resolve()
    (root / "inside_link").symlink_to(root / "acme" / "bot")  # a symlink inside the root is fine
    assert src.fetch("inside_link", None) == (root / "acme" / "bot").resolve()
    (root / "escape").symlink_to(outside / "secret")
    with pytest.raises(EngineError) as e:
        src.fetch("escape", None)
    assert e.value.type == ErrorType.VALIDATION and "outside" in e.value.message
    (root / "sneaky").mkdir()
    (root / "sneaky" / "adapter_config.json").write_text((outside / "secret" / "adapter_config.json").read_text())
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(outside / "secret" / "adapter_model.safetensors")
    with pytest.raises(EngineError) as e:
        src.fetch("sneaky", None)
    assert e.value.type == ErrorType.VALIDATION and "adapter_model.safetensors" in e.value.message
    for missing in ("nope", "acme", "acme/bot/adapter_config.json"):
        with pytest.raises(EngineError) as e:
            src.fetch(missing, None)
        assert e.value.type == ErrorType.ADAPTER_NOT_FOUND, missing
    with pytest.raises(EngineError) as e:
        LocalSource(None).fetch("acme/bot", None)
    assert e.value.type == ErrorType.ADAPTER_NOT_FOUND and "adapter_root" in e.value.message


def cycle_through_slot(store, names: list[str], budget: int, leases: dict | None = None) -> None:
    """Load each adapter into slot 0 in turn, releasing its prefetch lease (if any) once acquired,
    as the engine does; the host tier stays inside `budget` throughout."""
    for name in names:
        ref = AdapterRef(name)
        assert wait_ready(store, ref) == "ready"
        assert store.acquire(ref) == 0
        if leases is not None:
            leases[name].release()
        store.release(ref)
        assert store.stats()["host"]["bytes"] <= budget


def hub_standin(cache: Path, repo: str, commit: str, **kw) -> Path:
    """A hub-cache stand-in of `repo` holding a fresh adapter (`kw` goes to make_adapter)."""
    return hub_cache_standin(cache, repo, commit, make_adapter(SPEC, cache.parent / "src" / repo, **kw))


def test_hub_source_from_cache_layout(tmp_path):
    cache = tmp_path / "cache"
    c1, c2 = "a" * 40, "b" * 40
    hub_standin(cache, "acme/bot", c1, fill=1.0)
    hub_standin(cache, "other/bot", c2)
    src = HubSource(cache, offline=True)
    p = src.fetch("acme/bot", None)
    assert p.name == c1 and (p / "adapter_model.safetensors").is_file()
    with pytest.raises(EngineError) as e:  # a token reads its own cache only (test_tenants.py)
        src.fetch("acme/bot", "hf_secret")
    assert e.value.type == ErrorType.ADAPTER_NOT_FOUND
    assert src.fetch(f"acme/bot@{c1}", None) == p
    with pytest.raises(EngineError) as e:
        src.fetch("acme/missing", None)
    assert e.value.type == ErrorType.ADAPTER_NOT_FOUND and not e.value.retryable
    for bad in ("../x/y", "acme", "acme/bot/x", "/acme/bot", "acme/..", "a b/c"):
        with pytest.raises(EngineError) as e:
            src.fetch(bad, None)
        assert e.value.type == ErrorType.VALIDATION, bad
    allow = HubSource(cache, allow_orgs=("acme",), offline=True)
    assert allow.fetch("acme/bot", None) == p
    with pytest.raises(EngineError) as e:
        allow.fetch("other/bot", None)
    assert e.value.type == ErrorType.VALIDATION and "allow-list" in e.value.message
    src.evict("acme/bot")
    assert not (cache / "models--acme--bot").exists()


def test_hub_source_online_unreachable_is_retryable(tmp_path, monkeypatch):
    import huggingface_hub

    def down(*a, **kw):
        from huggingface_hub.errors import LocalEntryNotFoundError
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", down)
    with pytest.raises(EngineError) as e:
        HubSource(tmp_path, offline=False).fetch("acme/bot", None)
    assert e.value.type == ErrorType.ADAPTER_NOT_FOUND and e.value.retryable


# ---- store -----------------------------------------------------------------------------------

def test_load_acquire_and_device_lru(tmp_path):
    for name in "abc":
        make_adapter(SPEC, tmp_path / name, seed=ord(name))
    store = make_store(tmp_path, slots=2)
    refs = {n: AdapterRef(n) for n in "abc"}
    leases = [store.prefetch(ref) for ref in refs.values()]
    for ref in refs.values():
        assert wait_ready(store, ref) == "ready"
    sa = store.acquire(refs["a"])
    w = store.host.get("local:a")
    assert torch.equal(store.slots.A["q_proj"][1, sa, :8].T, w.modules[(1, "q_proj")][0])
    store.release(refs["a"])
    sb = store.acquire(refs["b"])
    store.release(refs["b"])
    assert {sa, sb} == {0, 1}
    assert store.acquire(refs["a"]) == sa  # hit; a is now most recent
    store.release(refs["a"])
    sc = store.acquire(refs["c"])  # evicts b, the least recently used
    assert sc == sb and store.slots.ranks[sc] == 8
    stats = store.stats()
    assert stats["device"]["evictions"] == 1 and stats["device"]["hits"] == 1 and stats["device"]["misses"] == 3
    assert stats["loads"] == 3 and stats["load_ms_p50"] > 0 and stats["load_ms_p99"] >= stats["load_ms_p50"]
    generation, load_ms = store.last_load(refs["a"])
    assert generation > 0 and load_ms > 0 and store.last_load(AdapterRef("never")) == (0, 0.0)
    for lease in leases:
        lease.release()
    store.close()


def test_pinned_slots_are_never_evicted(tmp_path):
    for name in "abc":
        make_adapter(SPEC, tmp_path / name, seed=ord(name))
    store = make_store(tmp_path, slots=2)
    a, b, c = AdapterRef("a"), AdapterRef("b"), AdapterRef("c")
    for ref in (a, b, c):
        wait_ready(store, ref)
    sa, sb = store.acquire(a), store.acquire(b)
    assert store.acquire(c) is None  # both slots pinned
    assert store.acquire(a) == sa  # a second pin of a resident adapter is fine
    store.release(a)
    assert store.acquire(c) is None  # a still pinned once
    store.release(b)
    assert store.acquire(c) == sb
    assert store.stats()["device"]["pinned"] == 2
    store.close()


def test_host_budget_respected(tmp_path):
    names = [f"n{i}" for i in range(6)]
    for i, name in enumerate(names):
        make_adapter(SPEC, tmp_path / name, seed=i)
    budget = int(adapter_bytes() * 2.5)
    store = make_store(tmp_path, slots=1, adapter_host_bytes=budget)
    cycle_through_slot(store, names, budget)
    stats = store.stats()
    assert stats["host"]["adapters"] == 2 and stats["host"]["evictions"] == 4
    assert stats["device"]["evictions"] == 5
    first = AdapterRef(names[0])  # in no tier any more: acquire asks for it again
    assert store.acquire(first) is None
    assert wait_ready(store, first) == "ready" and store.acquire(first) == 0
    assert store.stats()["loads"] == 7
    store.close()


def test_prefetch_dedupe_one_load(tmp_path):
    make_adapter(SPEC, tmp_path / "hot")
    src = Counting(tmp_path, delay=0.2)
    store = make_store(tmp_path, sources={"local": src})
    ref = AdapterRef("hot")
    threads = [threading.Thread(target=lambda: [store.prefetch(ref) for _ in range(25)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wait_ready(store, ref) == "ready"
    for _ in range(10):
        store.prefetch(ref)
    assert src.fetches == {"hot": 1}
    assert store.stats()["loads"] == 1
    store.close()


def test_prefetch_flood_does_not_evict_what_is_about_to_run(tmp_path):
    """With room for 2 adapters, a flood of prefetches loads 2 ahead, in arrival order, and the
    rest as those are used: each adapter is loaded once, and the host budget holds throughout."""
    names = [f"f{i}" for i in range(8)]
    for i, name in enumerate(names):
        make_adapter(SPEC, tmp_path / name, seed=i)
    src = Counting(tmp_path)
    budget = adapter_bytes() * 2
    store = make_store(tmp_path, slots=1, adapter_host_bytes=budget, sources={"local": src})
    leases = {name: store.prefetch(AdapterRef(name)) for name in names}
    wait_ready(store, AdapterRef("f1"))
    for name in names[2:]:  # the scheduler polls every waiting adapter: that does not jump the queue
        assert store.poll(AdapterRef(name)) == "loading"
    time.sleep(0.2)
    assert sorted(src.fetches) == ["f0", "f1"], src.fetches
    cycle_through_slot(store, names, budget, leases)
    assert src.fetches == {name: 1 for name in names}
    store.close()


def test_prefetch_lease_holds_until_released_once(tmp_path):
    """Room for 2 adapters: f2 waits while the prefetched f0 and f1 are held. f0 has two leases:
    releasing one (twice: the second call does nothing) still holds it; releasing the other lets
    f2 load at once."""
    names = ["f0", "f1", "f2"]
    for i, name in enumerate(names):
        make_adapter(SPEC, tmp_path / name, seed=i)
    store = make_store(tmp_path, slots=1, adapter_host_bytes=adapter_bytes() * 2)
    f0 = [store.prefetch(AdapterRef("f0")) for _ in range(2)]
    f1, f2 = store.prefetch(AdapterRef("f1")), store.prefetch(AdapterRef("f2"))
    wait_ready(store, AdapterRef("f0"))
    wait_ready(store, AdapterRef("f1"))
    assert store.stats()["queued"] == 1  # f2, held back
    f0[0].release()
    f0[0].release()
    assert f0[0].released and store.stats()["queued"] == 1  # f0's other lease still holds it
    f0[1].release()
    assert store.stats()["queued"] == 0  # f2 started as the last hold of f0 went
    assert wait_ready(store, AdapterRef("f2")) == "ready"
    assert store.stats()["host"]["adapters"] == 2  # f0 (no longer held) made room
    for lease in (f1, f2):
        lease.release()
    store.close()


def test_failure_remembered_then_retried(tmp_path):
    src = Counting(tmp_path)
    store = make_store(tmp_path, sources={"local": src}, adapter_failure_ttl_s=0.3)
    ref = AdapterRef("later")
    err = wait_ready(store, ref)
    assert isinstance(err, EngineError) and err.type == ErrorType.ADAPTER_NOT_FOUND
    for _ in range(5):  # every waiter gets the same answer, no new load
        store.prefetch(ref)
        assert store.poll(ref) is err
    assert store.acquire(ref) is None
    assert src.fetches == {"later": 1}
    make_adapter(SPEC, tmp_path / "later")
    time.sleep(0.35)
    assert wait_ready(store, ref) == "ready"
    assert src.fetches == {"later": 2}
    assert store.stats()["load_failures"] == 1
    store.close()


def test_bad_adapters_fail_alone(tmp_path):
    make_adapter(SPEC, tmp_path / "good")
    make_adapter(SPEC, tmp_path / "big", r=16)  # above max_lora_rank 8
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    store = make_store(tmp_path)
    refs = [AdapterRef(n) for n in ("big", "corrupt", "../etc", "good", "missing")]
    for ref in refs:
        store.prefetch(ref)
    states = {ref.id: wait_ready(store, ref) for ref in refs}
    assert states["good"] == "ready"
    assert states["big"].type == ErrorType.ADAPTER_INVALID and "max_lora_rank" in states["big"].message
    assert states["corrupt"].type == ErrorType.ADAPTER_INVALID
    assert states["../etc"].type == ErrorType.VALIDATION
    assert states["missing"].type == ErrorType.ADAPTER_NOT_FOUND
    hub = AdapterRef("acme/bot", source="hub")
    assert store.poll(hub).type == ErrorType.VALIDATION  # hub not enabled
    assert store.acquire(AdapterRef("good")) is not None
    store.close()


def test_changed_files_reloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_store, "REVALIDATE_S", 0.0)
    make_adapter(SPEC, tmp_path / "a", fill=1.0)
    store = make_store(tmp_path)
    ref = AdapterRef("a")
    wait_ready(store, ref)
    slot = store.acquire(ref)
    assert store.slots.A["q_proj"][0, slot, 0, 0] == 1.0
    make_adapter(SPEC, tmp_path / "a", fill=2.0)  # rewritten while a request runs on the old version
    lease = store.prefetch(ref)  # a new request for it: files re-checked, reloaded in the background
    deadline = time.monotonic() + 5
    while store.stats()["loads"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert store.acquire(ref) is None  # new version waits for the old version's request to finish
    store.release(ref)
    slot = store.acquire(ref)
    assert store.slots.A["q_proj"][0, slot, 0, 0] == 2.0
    store.release(ref)
    lease.release()
    lease = store.prefetch(ref)  # unchanged files: no reload
    time.sleep(0.2)
    assert store.stats()["loads"] == 2
    lease.release()
    store.close()


def test_unchanged_local_files_checked_inline(tmp_path, monkeypatch):
    """A due re-check of local files is a stat done at once: the adapter stays ready, so a group of
    requests for resident adapters is admitted in one step, not as the checks come back."""
    monkeypatch.setattr(adapter_store, "REVALIDATE_S", 0.0)
    make_adapter(SPEC, tmp_path / "a")
    store = make_store(tmp_path)
    ref = AdapterRef("a")
    wait_ready(store, ref)
    for _ in range(3):
        assert store.poll(ref) == "ready"
    assert store.stats()["loads"] == 1 and store.stats()["loading"] == 0
    store.close()


def test_hub_store_and_disk_budget(tmp_path):
    src = HubSource(tmp_path / "cache", offline=True)
    token = "hf_secret_token"
    cache = src.cache_for(token)  # what jobs with this token read (test_tenants.py)
    for i, org in enumerate(("o1", "o2", "o3")):
        hub_standin(cache, f"{org}/bot", f"{i}" * 40, seed=i)
    one = sum(f.stat().st_size for f in (cache / "models--o1--bot" / "snapshots" / ("0" * 40)).iterdir())
    store = make_store(tmp_path, sources={"hub": src}, adapter_disk_bytes=int(one * 2.5), hub_enabled=True)
    with capture_logs() as logs:
        for org in ("o1", "o2", "o3", "o4"):
            wait_ready(store, AdapterRef(f"{org}/bot", source="hub", api_token=token))
    events = [e["event"] for e in logs]
    assert events.count("adapter_loaded") == 3 and "adapter_evicted" in events and "adapter_load_failed" in events
    assert "hf_secret_token" not in repr(logs), "api_token is never logged"
    stats = store.stats()
    assert stats["disk"]["evictions"] == 1 and stats["disk"]["bytes"] <= int(one * 2.5)
    assert not (cache / "models--o1--bot").exists() and (cache / "models--o3--bot").exists()
    assert store.acquire(AdapterRef("o1/bot", source="hub", api_token=token)) is not None  # still in the host tier
    assert store.acquire(AdapterRef("o1/bot", source="hub")) is None  # no token: another tenant
    store.close()


def test_settled_loads_notify_the_engine(tmp_path):
    """Every load or failed load ends with on_settled, so a waiting engine polls again at once."""
    make_adapter(SPEC, tmp_path / "good")
    settled = threading.Event()
    store = make_store(tmp_path, on_settled=settled.set)
    store.prefetch(AdapterRef("good"))
    assert settled.wait(10) and store.poll(AdapterRef("good")) == "ready"
    settled.clear()
    store.prefetch(AdapterRef("missing"))
    assert settled.wait(10) and isinstance(store.poll(AdapterRef("missing")), EngineError)
    store.close()
