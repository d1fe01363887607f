"""The tiered adapter cache: device slots <- host RAM <- disk cache <- source.

- device: `LoraSlots`, `adapter_slots` adapters in the layout the op reads; `SlotTable` keeps its
  books. A slot is pinned while requests use it (`acquire` .. `release`), never evicted then.
- host: validated `AdapterWeights` in RAM (pinned memory on CUDA, so host -> device copies are
  asynchronous), a `ByteLRU` with the hard budget `adapter_host_bytes`.
- disk: hub snapshots in `adapter_disk_dir`, a `ByteLRU` with the budget `adapter_disk_bytes`
  (local adapters are already on disk: the adapter root is their source).
- source: `LocalSource` (adapter root) or `HubSource` (when `hub_enabled`), read by a `LoadQueue`.

Prefetch holds: every `prefetch` returns a `Lease` and counts one hold of the adapter until that
lease is released (the engine releases a request's lease when the request acquires its adapter or
leaves without running). An entry loaded ahead of use, or asked for again while resident, and not
acquired since, is "wanted" while some hold of it is outstanding (at most PREFETCH_HOLD_S):
eviction passes it over while others can go, and queued loads wait while wanted entries plus
loads in flight would overflow the host budget, so a flood of prefetches cannot evict what is
about to run. Only a load `acquire` needs at once skips that wait. When a load still does not fit
(sizes are estimated until loaded), wanted entries are evicted after all, the latest wanted first,
and queued again ahead of later arrivals with their now known size.

A failed load is remembered for `adapter_failure_ttl_s` and answered to every poll in that time.

Merged adapters (`AdapterRef.merge`, LoRAX's `merged_adapters`): built once on a loader thread from
their adapters' files (engine/adapter_merge.py), then cached in the host and device tiers like any
adapter, under a key derived from the definition (source, ids, weights, strategy, density, sign
method; the token only as the source's scope). Their stamp is their adapters' stamps together, so
a change of one adapter's files gives a new merged version (see "Staleness"). The hub snapshots
they fetch join the disk tier under their own adapters' keys.

Tenants: a source may key entries by who asks (`AdapterSource.scope`: the hub, by a salted
fingerprint of the job's api_token). Such entries are separate adapters in every tier (device,
host, disk, failures, and the scheduler's queues): a private hub adapter fetched with tenant A's
token is never served to a job with another token or none, and A's jobs share A's entry.

Staleness: `prefetch` (called for every submitted request) re-stats a local adapter's files
(mtime, size, inode) at most every REVALIDATE_S per adapter. Until that check (queued ahead of
loads) is done, `poll` says "loading", so the request that triggered it runs on what it found; a
change reloads the adapter under a new generation. From then on `acquire` hands out the new
generation: if the old one is in a slot still pinned by running requests, new requests wait
(acquire returns None) until those finish, then the slot is reloaded. So a request submitted more
than REVALIDATE_S after the files changed runs on the new files, at worst after the old version's
running requests (bounded by their max_new_tokens) drain. Replace adapter files atomically (write
a new directory, then rename) so a load never reads a half-written file. Hub adapters are
re-resolved (`main` moves) whenever they are loaded from source, i.e. after leaving the host tier.

Threads: `acquire`, `release`, `poll` run on the engine thread (they alone touch LoraSlots);
`prefetch`, lease releases and `last_load` from any thread; loader threads fill the host and disk
tiers. One lock guards everything.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import structlog

from engine.adapter import SPARES, AdapterWeights, load_peft_adapter
from engine.adapter_merge import load_merged_adapter
from engine.adapter_source import AdapterSource, HubSource, LocalSource
from engine.byte_lru import ByteLRU
from engine.config import EngineConfig
from engine.lease import Lease
from engine.load_queue import LoadJob, LoadQueue
from engine.lora_slots import LoraSlots
from engine.request import AdapterRef, EngineError, ErrorType
from engine.slot_table import SlotTable

if TYPE_CHECKING:
    from engine.model_loader import ModelSpec

log = structlog.get_logger(__name__)

REVALIDATE_S = 2.0  # local adapters: files re-checked at most this often (per adapter)
PREFETCH_HOLD_S = 60.0  # a prefetched, never-acquired host entry is held for at most this long


@dataclass(eq=False)
class _Adapter:
    """What the store knows of one adapter while it is in the host or the device tier."""

    ref: AdapterRef
    generation: int  # version: every load from source gets a new one
    stamp: Hashable | None  # source fingerprint taken before the files were read
    checked_at: float  # monotonic time the stamp was last compared
    wanted_at: float  # monotonic time it was loaded, or prefetched again while resident
    load_ms: float
    nbytes: int
    used: bool = False  # acquired since it was loaded or last prefetched
    revalidating: bool = False  # its files are being re-checked: not "ready" until then


@dataclass
class _Tier:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions}


@dataclass
class _Counters:
    device: _Tier = field(default_factory=_Tier)
    host: _Tier = field(default_factory=_Tier)
    disk: _Tier = field(default_factory=_Tier)
    loads: int = 0
    failures: int = 0
    load_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

    def load_ms_quantile(self, q: float) -> float:
        times = sorted(self.load_ms)
        return round(times[min(len(times) - 1, int(q * len(times)))], 2) if times else 0.0


class AdapterStore:
    def __init__(self, config: EngineConfig, spec: ModelSpec, slots: LoraSlots,
                 sources: dict[str, AdapterSource] | None = None,
                 on_settled: Callable[[], None] | None = None) -> None:
        """`on_settled` is called (from a loader thread) whenever a load or re-check ends, so the
        engine can poll again at once instead of on its next timed wake-up."""
        self.config, self.spec, self.slots = config, spec, slots
        if sources is None:
            sources = {"local": LocalSource(config.adapter_root)}
            if config.hub_enabled:
                sources["hub"] = HubSource(config.adapter_disk_dir, config.hub_allow_orgs, config.allow_pickle,
                                           worker_credentials=config.hub_worker_credentials)
        self.sources = sources
        self._on_settled = on_settled
        self._lock = threading.Lock()
        self._adapters: dict[str, _Adapter] = {}  # AdapterRef.key -> in the host or the device tier
        self.host: ByteLRU[str, AdapterWeights] = ByteLRU(config.adapter_host_bytes)
        self.disk: ByteLRU[str, AdapterRef] = ByteLRU(config.adapter_disk_bytes)
        self.slot_table = SlotTable(slots.num_slots)
        self.load_queue = LoadQueue(self._load)
        self._holds: dict[str, int] = {}  # key -> prefetch leases not yet released
        self._failures: dict[str, tuple[EngineError, float]] = {}  # key -> (error, until)
        self._generation = 0
        self._counters = _Counters()

    # ---- any thread -------------------------------------------------------------------------

    def scoped(self, ref: AdapterRef) -> AdapterRef:
        """`ref` keyed for its token where its source needs that (see "Tenants"). Every method
        below scopes the refs it is given; the engine scopes a request's ref once, at submit, so
        the scheduler's per-adapter queues keep tenants apart too."""
        if ref.scope or not ref.api_token or ref.source not in self.sources:
            return ref
        scope = self.sources[ref.source].scope(ref.api_token)
        return replace(ref, scope=scope) if scope else ref

    def prefetch(self, ref: AdapterRef) -> Lease:
        """Start loading `ref` (source -> disk -> host) in the background; returns at once. The
        lease holds the loaded adapter against eviction until released (see "Prefetch holds")."""
        ref = self.scoped(ref)
        key = ref.key
        with self._lock:
            self._holds[key] = self._holds.get(key, 0) + 1
            if self._request(ref, demand=False):
                self._start_loads()
        return Lease(lambda: self._unhold(key))

    def last_load(self, ref: AdapterRef) -> tuple[int, float]:
        """(generation, source load ms) of the version of `ref` the store holds now; (0, 0.0) if
        none. Generations only grow: comparing them tells whether a load ended in between."""
        ref = self.scoped(ref)
        with self._lock:
            a = self._adapters.get(ref.key)
            return (a.generation, a.load_ms) if a is not None else (0, 0.0)

    def stats(self) -> dict:
        with self._lock:
            c = self._counters
            return {
                "device": {**c.device.as_dict(), "slots": self.slot_table.num_slots, "used": self.slot_table.num_used,
                           "pinned": self.slot_table.num_pinned, "bytes": self.slots.nbytes},
                "host": {**c.host.as_dict(), "adapters": len(self.host), "bytes": self.host.nbytes,
                         "budget_bytes": self.host.budget},
                "disk": {**c.disk.as_dict(), "adapters": len(self.disk), "bytes": self.disk.nbytes,
                         "budget_bytes": self.disk.budget},
                "loads": c.loads, "load_failures": c.failures, "loading": self.load_queue.num_running,
                "queued": self.load_queue.num_waiting, "load_ms_p50": c.load_ms_quantile(0.5),
                "load_ms_p99": c.load_ms_quantile(0.99),
            }

    def close(self) -> None:
        """Stop loading: queued loads never start (a lease released later only drops its hold)."""
        with self._lock:
            self.load_queue.close()

    # ---- engine thread ----------------------------------------------------------------------

    def poll(self, ref: AdapterRef) -> Literal["ready", "loading"] | EngineError:
        """"ready" when `acquire` can place it without a source load; its EngineError if its last
        load failed less than adapter_failure_ttl_s ago; otherwise "loading" (queued like a
        prefetch if it is not yet). Cheap: the scheduler may poll every waiting adapter each step."""
        ref = self.scoped(ref)
        with self._lock:
            a = self._adapters.get(ref.key)
            if a is not None and self._ready(a) and not a.revalidating:
                return "ready"
            if self._request(ref, demand=False) or (self.load_queue.num_waiting and not self.load_queue.num_running):
                self._start_loads()  # (the latter: held entries may have outlived PREFETCH_HOLD_S)
            failure = self._failures.get(ref.key)
            return failure[0] if failure is not None else "loading"

    def acquire(self, ref: AdapterRef) -> int | None:
        """The device slot holding `ref`, pinned until `release`. Copies host -> slot if needed,
        evicting the least recently used unpinned slot. None: not placeable now (every slot is
        pinned, the adapter is not in the host tier, or a newer version waits for the old
        version's requests to finish); the caller keeps the request waiting and retries."""
        ref = self.scoped(ref)
        key = ref.key
        with self._lock:
            a = self._adapters.get(key)
            target = self.slot_table.find(key)
            if target is not None:
                if a is None or self.slot_table.generation(target) == a.generation:
                    return self._pin(target, a, hit=True)
                if self.slot_table.is_pinned(target):
                    return None  # newer version: wait for the old one's requests to finish
            weights = self.host.get(key)
            if a is None or weights is None:
                self._request(ref, demand=True)
                self._start_loads()
                return None
            if target is None:
                target = self._free_slot()
                if target is None:
                    return None
            self.slots.load(target, weights)
            self.slot_table.assign(target, key, a.generation)
            self.host.touch(key)
            slot = self._pin(target, a, hit=False)
            self._start_loads()  # `used` changed: held-back prefetches may fit now
            return slot

    def scratch_slot(self) -> int | None:
        """A device slot holding no adapter, or None, for weights that are no adapter's (the
        warm-up's). It stays unassigned: the caller clears it before the next `acquire`."""
        with self._lock:
            return self.slot_table.empty()

    def release(self, ref: AdapterRef) -> None:
        """Unpin one `acquire` of `ref`."""
        ref = self.scoped(ref)
        with self._lock:
            if not self.slot_table.unpin(ref.key):
                log.warning("adapter_release_unpinned", adapter=ref.key)

    # ---- internals (called with the lock held) ----------------------------------------------

    def _unhold(self, key: str) -> None:
        """A prefetch lease was released: drop its hold; held-back loads may fit now."""
        with self._lock:
            left = self._holds.get(key, 0) - 1
            if left > 0:
                self._holds[key] = left
                return
            self._holds.pop(key, None)
            self._start_loads()

    def _ready(self, a: _Adapter) -> bool:
        """In the host tier, or this very version in a device slot."""
        return a.ref.key in self.host or self.slot_table.holds(a.ref.key, a.generation)

    def _wanted(self, a: _Adapter | None, now: float) -> bool:
        """Loaded or asked for again, not acquired since, and some prefetch lease of it is still
        held: requests wait for it."""
        return (a is not None and not a.used and now - a.wanted_at < PREFETCH_HOLD_S
                and self._holds.get(a.ref.key, 0) > 0)

    def _pin(self, slot: int, a: _Adapter | None, hit: bool) -> int:
        self.slot_table.pin(slot)
        if a is not None:
            a.used = True
        self._counters.device.hits += hit
        self._counters.device.misses += not hit
        return slot

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used unpinned one (evicting its adapter),
        preferring adapters no request waits for."""
        now = time.monotonic()
        taken = self.slot_table.take(lambda key: self._wanted(self._adapters.get(key), now))
        if taken is None:
            return None
        slot, old = taken
        if old is not None:
            self.slots.clear(slot)
            self._counters.device.evictions += 1
            log.info("adapter_evicted", adapter=old, tier="device", slot=slot)
            a = self._adapters.get(old)
            if a is not None and old not in self.host:  # in no tier any more
                del self._adapters[old]
                if self._wanted(a, now):
                    self._requeue(a)
        return slot

    def _request(self, ref: AdapterRef, demand: bool) -> bool:
        """Queue a load of `ref` unless it is resident, loading, or failed recently; `demand`: acquire
        needs it now, so it runs first and is not held back by the budget. True if queued."""
        key, now = ref.key, time.monotonic()
        failure = self._failures.get(key)
        if failure is not None:
            if failure[1] > now:
                return False
            del self._failures[key]
        if self.load_queue.is_running(key):
            return False
        if self.load_queue.is_waiting(key):
            if demand:
                self.load_queue.demand(ref)
            return demand
        a = self._adapters.get(key)
        if a is not None and self._ready(a):
            self._counters.host.hits += 1
            a.used, a.wanted_at = False, now  # wanted again: held like a fresh prefetch until acquired,
            self.host.touch(key)  # else later prefetches evict it before its turn comes
            if a.stamp is not None and now - a.checked_at >= REVALIDATE_S:
                a.checked_at = now
                if self.sources[ref.source].cheap_stamp and self._stamp(ref) == a.stamp:
                    return False  # unchanged files: ready now
                self.load_queue.add(LoadJob(ref, revalidate=True))  # usually a stat: ahead of loads
                a.revalidating = True  # not "ready" until checked: this request must not run stale
                return True
            return False
        if ref.source not in self.sources:
            self._fail(key, EngineError(ErrorType.VALIDATION, f"adapter source {ref.source!r} is not enabled"))
            return False
        self._counters.host.misses += 1
        self.load_queue.add(LoadJob(ref, demanded=demand))
        return True

    def _stamp(self, ref: AdapterRef) -> Hashable | None:
        """The source's fingerprint of `ref`'s files; a merge's is its adapters' together (None
        when any is None), so a change of one adapter's files gives a new merged version."""
        source = self.sources[ref.source]
        if ref.merge is None:
            return source.stamp(ref.id)
        stamps = tuple(source.stamp(adapter_id) for adapter_id in ref.merge.ids)
        return None if None in stamps else stamps

    def _start_loads(self) -> None:
        self.load_queue.start(self._fits)

    def _fits(self, job: LoadJob) -> bool:
        """May a prefetch load start? Not while the entries held for waiting requests, plus it,
        plus the loads running (estimated at the mean size) would overflow the host budget."""
        now = time.monotonic()
        held = sum(a.nbytes for key, a in self._adapters.items() if key in self.host and self._wanted(a, now))
        mean = self.host.mean_nbytes
        need = job.size_hint if job.size_hint is not None else mean
        running = self.load_queue.num_running
        return held + need + mean * running <= self.host.budget or not (held or running)

    def _fail(self, key: str, error: EngineError) -> None:
        self._failures[key] = (error, time.monotonic() + self.config.adapter_failure_ttl_s)
        self._counters.failures += 1
        log.warning("adapter_load_failed", adapter=key, error_type=error.type.value, error=error.message,
                    retryable=error.retryable)

    def _requeue(self, a: _Adapter) -> None:
        """`a` left every tier while requests still wait for it: load it again ahead of later
        arrivals (it came before them), once its known size fits beside the held entries."""
        key = a.ref.key
        if not (self.load_queue.is_running(key) or self.load_queue.is_waiting(key)):
            self.load_queue.add_after_urgent(LoadJob(a.ref, size_hint=a.nbytes))

    def _evict_host(self, keep: str) -> None:
        """LRU over entries no request waits for. The budget is a hard limit: if that is not enough
        (estimates of unknown sizes, loads `acquire` demanded), entries loaded ahead for waiting
        requests go too, the latest wanted first (the furthest back in line), and load again later."""
        now = time.monotonic()

        def held(key: str) -> bool:
            return self._wanted(self._adapters[key], now)

        for key, _, nbytes in self.host.evict(lambda key: key != keep and not held(key)):
            self._left_host(key, nbytes)
        latest_first = sorted((key for key in self.host.keys() if key != keep and held(key)),
                              key=lambda key: self._adapters[key].wanted_at, reverse=True)
        for key in latest_first:
            if not self.host.over_budget:
                return
            entry = self.host.pop(key)
            assert entry is not None
            a = self._left_host(key, entry[1])
            if not self._ready(a):  # not in a slot either
                self._requeue(a)

    def _left_host(self, key: str, nbytes: int) -> _Adapter:
        """Bookkeeping for an entry evicted from the host tier; its record."""
        a = self._adapters[key]
        if self.slot_table.find(key) is None:
            del self._adapters[key]
        self._counters.host.evictions += 1
        log.info("adapter_evicted", adapter=key, tier="host", bytes=nbytes)
        return a

    def _evict_disk(self, keep: str) -> None:
        for key, ref, nbytes in self.disk.evict(lambda key: key != keep and not self.load_queue.is_running(key)):
            self.sources[ref.source].evict(ref.id, ref.api_token)
            self._counters.disk.evictions += 1
            log.info("adapter_evicted", adapter=key, tier="disk", bytes=nbytes)

    # ---- loader threads ---------------------------------------------------------------------

    def _load(self, job: LoadJob) -> None:
        ref = job.ref
        key, source = ref.key, self.sources[ref.source]
        t0 = time.perf_counter()
        disk_bytes, on_disk, unchanged, stamp, w = None, False, False, None, None
        merged_from: list[tuple[AdapterRef, int]] = []
        try:
            stamp = self._stamp(ref)  # before reading: a change while we read is seen next time
            with self._lock:
                current = self._adapters.get(key)
                unchanged = job.revalidate and current is not None and current.stamp == stamp
            if not unchanged and ref.merge is not None:
                w, merged_from = self._merge(ref)
            elif not unchanged:
                with self._lock:
                    on_disk = key in self.disk
                path = source.fetch(ref.id, ref.api_token)
                if source.caches_on_disk:
                    disk_bytes = _dir_bytes(path)
                w = load_peft_adapter(path, self.spec, self.slots.dtype, self.slots.max_rank,
                                      self.config.allow_pickle, key=key)
            if w is not None and self.slots.device.type == "cuda":
                w = w.pin_memory()
            error = None
        except EngineError as e:
            error = e
        except Exception as e:  # out of memory, disk faults: not the adapter's fault
            error = EngineError(ErrorType.INTERNAL, f"adapter load failed: {type(e).__name__}: {e}", retryable=True)
        ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            self.load_queue.finish(key)
            current = self._adapters.get(key)
            if current is not None:
                current.revalidating = False
            if error is not None and job.revalidate:  # keep serving the version we have
                log.warning("adapter_revalidate_failed", adapter=key, error=error.message)
            elif error is not None:
                self._fail(key, error)
            elif w is not None:
                self._insert(ref, w, stamp, ms, disk_bytes, on_disk)
                for part, nbytes in merged_from:  # hub snapshots of a merge's adapters: the disk tier's
                    self.disk.put(part.key, part, nbytes)
                if merged_from:
                    self._evict_disk(keep=key)
            self._start_loads()
        if self._on_settled is not None:
            self._on_settled()
        SPARES.refill()  # after the engine is woken: the next load of a file this size reads into ready pages

    def _insert(self, ref: AdapterRef, w: AdapterWeights, stamp: Hashable | None, ms: float,
                disk_bytes: int | None, on_disk: bool) -> None:
        key, now = ref.key, time.monotonic()
        self._failures.pop(key, None)
        reloaded = key in self._adapters
        self._generation += 1
        self._adapters[key] = _Adapter(ref, self._generation, stamp, now, now, ms, w.nbytes)
        self.host.put(key, w, w.nbytes)
        self._counters.loads += 1
        self._counters.load_ms.append(ms)
        if disk_bytes is not None:
            self._counters.disk.hits += on_disk
            self._counters.disk.misses += not on_disk
            self.disk.put(key, ref, disk_bytes)
            self._evict_disk(keep=key)
        log.info("adapter_loaded", adapter=key, ms=round(ms, 1), bytes=w.nbytes, rank=w.rank,
                 generation=self._generation, reloaded=reloaded)
        self._evict_host(keep=key)


    def _merge(self, ref: AdapterRef) -> tuple[AdapterWeights, list[tuple[AdapterRef, int]]]:
        """Build the merged adapter `ref` from its adapters' files (engine/adapter_merge.py); also
        the hub snapshots it fetched, with their bytes, for the disk tier."""
        assert ref.merge is not None
        source = self.sources[ref.source]
        fetched: list[tuple[AdapterRef, int]] = []

        def fetch(adapter_id: str) -> Path:
            path = source.fetch(adapter_id, ref.api_token)
            if source.caches_on_disk:
                fetched.append((replace(ref, id=adapter_id, merge=None), _dir_bytes(path)))
            return path

        w = load_merged_adapter(ref.merge, fetch, self.spec, self.slots.dtype, self.slots.max_rank,
                                self.config.allow_pickle, ref.key)
        log.info("adapter_merged", adapter=ref.key, ids=list(ref.merge.ids), weights=list(ref.merge.weights),
                 merge_strategy=ref.merge.merge_strategy, density=ref.merge.density,
                 majority_sign_method=ref.merge.majority_sign_method)
        return w, fetched


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
