"""The tiered adapter cache: device slots <- host RAM <- disk cache <- source.

- device: `LoraSlots`, `adapter_slots` adapters in the layout the op reads. A slot is
  pinned while requests use it (`acquire` .. `release`) and never evicted then; otherwise LRU.
- host: validated `AdapterWeights` in RAM (pinned memory on CUDA, so host -> device copies are
  asynchronous), `adapter_host_bytes` budget (a hard limit), LRU. An entry loaded ahead of use,
  or asked for again by a new request while resident, and not acquired since is "wanted" while
  some `prefetch` of it is still outstanding (see "Wants" below): protected for PREFETCH_HOLD_S,
  and queued loads (FIFO: the order requests arrived) wait while such entries plus loads in
  flight would overflow the budget, so a flood of prefetches cannot evict what is about to run.
  Only a load `acquire` needs at once (its host copy went away) skips that wait. When a load still does not fit (sizes are estimated until loaded), wanted
  entries are evicted after all, the latest wanted first, and re-queued ahead of later arrivals
  with their now known size, so they load again in their turn and nothing waits for the hold.
- disk: hub snapshots in `adapter_disk_dir`, `adapter_disk_bytes` budget, LRU (local adapters are
  already on disk: the adapter root is their source).
- source: `LocalSource` (adapter root) or `HubSource` (when `hub_enabled`).

Wants: every `prefetch` counts one outstanding want of the adapter, settled by exactly one of
`acquire` (the request ran; a later re-acquire, e.g. after preemption, settles another want if one
is left, never below zero) or `unwant` (the request leaves without ever acquiring: expired,
cancelled, rejected, failed). The protection lasts only while the count is above zero, so a request
that never runs drops its own hold at once, and two requests for one adapter do not cancel each
other: the entry stays wanted until the last one acquires or leaves (or PREFETCH_HOLD_S passes).

Loads run in a small thread pool: one load per adapter however many requests want it. A failed
load is remembered for `adapter_failure_ttl_s` and answered to every poll in that time.

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
`prefetch` and `unwant` from any thread; loader threads only fill the host and disk tiers.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import structlog
from threadpoolctl import threadpool_limits

from engine.adapter import AdapterWeights, load_peft_adapter
from engine.adapter_source import AdapterSource, HubSource, LocalSource
from engine.config import EngineConfig
from engine.lora_slots import LoraSlots
from engine.request import AdapterRef, EngineError, ErrorType

if TYPE_CHECKING:
    from engine.model_loader import ModelSpec

log = structlog.get_logger(__name__)

REVALIDATE_S = 2.0  # local adapters: files re-checked at most this often (per adapter)
PREFETCH_HOLD_S = 60.0  # a prefetched, never-acquired host entry is not evicted for this long
LOAD_WORKERS = 2


@dataclass(eq=False)
class _Adapter:
    """What the store knows of one adapter while it is in the host or the device tier."""

    ref: AdapterRef
    generation: int
    stamp: Hashable | None  # source fingerprint taken before the files were read
    checked_at: float  # monotonic time the stamp was last compared
    wanted_at: float  # monotonic time it was loaded, or prefetched again while resident
    load_ms: float
    nbytes: int
    weights: AdapterWeights | None  # None: not in the host tier (may still be in a slot)
    used: bool = False  # acquired since it was loaded or last prefetched


@dataclass(eq=False)
class _Slot:
    key: str | None = None
    generation: int = -1
    pins: int = 0
    last_used: int = 0


@dataclass(eq=False)
class _Tier:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions}


def _single_threaded_torch() -> None:
    """Loader threads run torch ops on themselves alone. A loader that ran a parallel op would keep
    an OpenMP pool of its own, and with more OpenMP threads than cores libgomp stops spinning in
    every pool: the engine's decode steps would slow down (see `Engine.__init__`). The limit
    (omp_set_num_threads) holds for the calling thread only."""
    import torch

    torch.get_num_threads()  # torch's once-per-thread init first: it would reset the limit later
    threadpool_limits(1, user_api="openmp")


class AdapterStore:
    def __init__(self, config: EngineConfig, spec: ModelSpec, slots: LoraSlots,
                 sources: dict[str, AdapterSource] | None = None,
                 on_settled: Callable[[], None] | None = None) -> None:
        """`on_settled` is called (from a loader thread) whenever a load or re-check ends, so the
        engine can poll again at once instead of on its next timed wake-up."""
        self.config, self.spec, self.slots = config, spec, slots
        self._on_settled = on_settled
        if sources is None:
            sources = {"local": LocalSource(config.adapter_root)}
            if config.hub_enabled:
                sources["hub"] = HubSource(config.adapter_disk_dir, config.hub_allow_orgs, config.allow_pickle)
        self.sources = sources
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(LOAD_WORKERS, thread_name_prefix="adapter-load",
                                        initializer=_single_threaded_torch)
        self._adapters: dict[str, _Adapter] = {}
        self._host_lru: OrderedDict[str, None] = OrderedDict()  # keys with weights, oldest first
        self._host_bytes = 0
        self._disk: OrderedDict[str, tuple[AdapterRef, int]] = OrderedDict()  # key -> (ref, bytes)
        self._disk_bytes = 0
        self._slot_meta = [_Slot() for _ in range(slots.num_slots)]
        self._slot_of: dict[str, int] = {}
        self._pending: OrderedDict[str, tuple[AdapterRef, bool, bool]] = OrderedDict()  # (ref, demanded, revalidate)
        self._size_hint: dict[str, int] = {}  # pending keys whose host bytes are known (requeued)
        self._revalidating: set[str] = set()  # resident, files being re-checked: poll waits
        self._inflight: dict[str, AdapterRef] = {}
        self._wants: dict[str, int] = {}  # key -> prefetches not yet settled by acquire or unwant
        self._failures: dict[str, tuple[EngineError, float]] = {}
        self._generation = 0
        self._tick = 0
        self._tiers = {"device": _Tier(), "host": _Tier(), "disk": _Tier()}
        self._load_times: deque[float] = deque(maxlen=1024)
        self._loads = self._failed = 0

    # ---- any thread -------------------------------------------------------------------------

    def prefetch(self, ref: AdapterRef) -> None:
        """Start loading `ref` (source -> disk -> host) in the background; returns at once. Counts
        one want of `ref`: follow it with one `acquire` or, if the request will never acquire, one
        `unwant`."""
        with self._lock:
            self._wants[ref.key] = self._wants.get(ref.key, 0) + 1
            if self._request(ref, demand=False):
                self._start_loads()

    def unwant(self, ref: AdapterRef) -> None:
        """Settle one `prefetch` of `ref` whose request leaves without acquiring it (expired,
        cancelled, rejected, failed). Drops only the protection that prefetch added: the entry
        stays wanted while other prefetches of it are outstanding. Call it once per such prefetch,
        never after an `acquire` for the same request. Thread-safe."""
        with self._lock:
            if self._settle(ref.key) == 0:
                self._start_loads()  # its hold no longer counts: held-back loads may fit now

    def stats(self) -> dict:
        with self._lock:
            times = sorted(self._load_times)
            pct = (lambda q: round(times[min(len(times) - 1, int(q * len(times)))], 2)) if times else (lambda q: 0.0)
            return {
                "device": {**self._tiers["device"].as_dict(), "slots": len(self._slot_meta),
                           "used": len(self._slot_of), "pinned": sum(s.pins > 0 for s in self._slot_meta),
                           "bytes": self.slots.nbytes},
                "host": {**self._tiers["host"].as_dict(), "adapters": len(self._host_lru),
                         "bytes": self._host_bytes, "budget_bytes": self.config.adapter_host_bytes},
                "disk": {**self._tiers["disk"].as_dict(), "adapters": len(self._disk),
                         "bytes": self._disk_bytes, "budget_bytes": self.config.adapter_disk_bytes},
                "loads": self._loads, "load_failures": self._failed, "loading": len(self._inflight),
                "queued": len(self._pending), "load_ms_p50": pct(0.5), "load_ms_p99": pct(0.99),
            }

    def load_ms(self, ref: AdapterRef) -> float:
        """How long the last load of `ref` from its source took (0 if unknown)."""
        with self._lock:
            a = self._adapters.get(ref.key)
            return a.load_ms if a is not None else 0.0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- engine thread ----------------------------------------------------------------------

    def poll(self, ref: AdapterRef) -> Literal["ready", "loading"] | EngineError:
        """"ready" when `acquire` can place it without a source load; its EngineError if its last
        load failed less than adapter_failure_ttl_s ago; otherwise "loading" (queued like a
        prefetch if it is not yet). Cheap: the scheduler may poll every waiting adapter each step."""
        with self._lock:
            if self._ready(ref.key) and ref.key not in self._revalidating:
                return "ready"
            if self._request(ref, demand=False) or (self._pending and not self._inflight):
                self._start_loads()  # (the latter: held entries may have outlived PREFETCH_HOLD_S)
            failure = self._failures.get(ref.key)
            return failure[0] if failure is not None else "loading"

    def acquire(self, ref: AdapterRef) -> int | None:
        """The device slot holding `ref`, pinned until `release`. Copies host -> slot if needed,
        evicting the least recently used unpinned slot. None: not placeable now (every slot is
        pinned, the adapter is not in the host tier, or a newer version waits for the old
        version's requests to finish); the caller keeps the request waiting and retries."""
        key = ref.key
        with self._lock:
            a = self._adapters.get(key)
            target = self._slot_of.get(key)
            if target is not None:
                s = self._slot_meta[target]
                if a is None or s.generation == a.generation:
                    return self._pin(target, a, hit=True)
                if s.pins > 0:
                    return None  # newer version: wait for the old one's requests to finish
            if a is None or a.weights is None:
                self._request(ref, demand=True)
                self._start_loads()
                return None
            if target is None:
                target = self._free_slot()
                if target is None:
                    return None
            self.slots.load(target, a.weights)
            self._slot_meta[target] = _Slot(key, a.generation)
            self._slot_of[key] = target
            self._touch_host(key)
            slot = self._pin(target, a, hit=False)
            self._start_loads()  # `used` changed: held-back prefetches may fit now
            return slot

    def release(self, ref: AdapterRef) -> None:
        """Unpin one `acquire` of `ref`."""
        with self._lock:
            slot = self._slot_of.get(ref.key)
            if slot is not None and self._slot_meta[slot].pins > 0:
                self._slot_meta[slot].pins -= 1
            else:
                log.warning("adapter_release_unpinned", adapter=ref.key)

    # ---- internals (called with the lock held) ----------------------------------------------

    def _ready(self, key: str) -> bool:
        a = self._adapters.get(key)
        if a is None:
            return False
        slot = self._slot_of.get(key)
        return a.weights is not None or (slot is not None and self._slot_meta[slot].generation == a.generation)

    def _settle(self, key: str) -> int:
        """One want of `key` is settled (acquired or given up); the wants left."""
        left = self._wants.get(key, 0) - 1
        if left > 0:
            self._wants[key] = left
            return left
        self._wants.pop(key, None)
        return 0

    def _pin(self, slot: int, a: _Adapter | None, hit: bool) -> int:
        self._tick += 1
        self._settle(self._slot_meta[slot].key)
        meta = self._slot_meta[slot]
        meta.pins += 1
        meta.last_used = self._tick
        if a is not None:
            a.used = True
        self._tiers["device"].hits += hit
        self._tiers["device"].misses += not hit
        return slot

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used unpinned one (evicting its adapter),
        preferring adapters no request waits for."""
        free = [i for i, s in enumerate(self._slot_meta) if s.key is None]
        if free:
            return free[0]
        idle = [i for i, s in enumerate(self._slot_meta) if s.pins == 0]
        if not idle:
            return None
        now = time.monotonic()
        victim = min(idle, key=lambda i: (self._wanted(self._adapters.get(self._slot_meta[i].key), now),
                                          self._slot_meta[i].last_used))
        old = self._slot_meta[victim].key
        del self._slot_of[old]
        self._slot_meta[victim] = _Slot()
        self.slots.clear(victim)
        self._tiers["device"].evictions += 1
        log.info("adapter_evicted", adapter=old, tier="device", slot=victim)
        a = self._adapters.get(old)
        if a is not None and a.weights is None:
            del self._adapters[old]
            if self._wanted(a, now):
                self._requeue(a)
        return victim

    def _request(self, ref: AdapterRef, demand: bool) -> bool:
        """Queue a load of `ref` unless it is resident, loading, or failed recently; `demand`: acquire
        needs it now, so it runs first and is not held back by the budget. True if queued."""
        key, now = ref.key, time.monotonic()
        failure = self._failures.get(key)
        if failure is not None:
            if failure[1] > now:
                return False
            del self._failures[key]
        if key in self._inflight:
            return False
        if key in self._pending:
            if demand:
                self._pending[key] = (ref, True, False)
                self._pending.move_to_end(key, last=False)
            return demand
        if self._ready(key):
            self._tiers["host"].hits += 1
            a = self._adapters[key]
            a.used, a.wanted_at = False, now  # wanted again: protected like a fresh prefetch until acquired,
            self._touch_host(key)  # else later prefetches evict it before its turn comes
            if a.stamp is not None and now - a.checked_at >= REVALIDATE_S:
                a.checked_at = now
                if self.sources[ref.source].cheap_stamp and self.sources[ref.source].stamp(ref.id) == a.stamp:
                    return False  # unchanged files: ready now
                self._pending[key] = (ref, False, True)
                self._pending.move_to_end(key, last=False)  # usually a stat: ahead of loads
                self._revalidating.add(key)  # not "ready" until checked: this request must not run stale
                return True
            return False
        if ref.source not in self.sources:
            self._fail(key, EngineError(ErrorType.VALIDATION, f"adapter source {ref.source!r} is not enabled"))
            return False
        self._tiers["host"].misses += 1
        self._pending[key] = (ref, demand, False)
        if demand:
            self._pending.move_to_end(key, last=False)
        return True

    def _start_loads(self) -> None:
        now = time.monotonic()
        while self._pending and len(self._inflight) < LOAD_WORKERS:
            key = next(iter(self._pending))
            ref, demanded, revalidate = self._pending[key]
            if not (demanded or revalidate):
                held = sum(a.nbytes for a in self._adapters.values() if a.weights is not None and self._wanted(a, now))
                avg = self._host_bytes / len(self._host_lru) if self._host_lru else 0
                need = self._size_hint.get(key, avg)
                if held + need + avg * len(self._inflight) > self.config.adapter_host_bytes and (held or self._inflight):
                    return  # prefetched entries would evict each other: wait until some are used
            del self._pending[key]
            self._size_hint.pop(key, None)
            self._inflight[key] = ref
            self._pool.submit(self._load, ref, revalidate)

    def _fail(self, key: str, error: EngineError) -> None:
        self._failures[key] = (error, time.monotonic() + self.config.adapter_failure_ttl_s)
        self._failed += 1
        log.warning("adapter_load_failed", adapter=key, error_type=error.type.value, error=error.message,
                    retryable=error.retryable)

    def _touch_host(self, key: str) -> None:
        if key in self._host_lru:
            self._host_lru.move_to_end(key)

    def _wanted(self, a: _Adapter | None, now: float) -> bool:
        """Prefetched (loaded or asked for again), not acquired since, and some prefetch of it not yet
        settled: requests wait for it."""
        return (a is not None and not a.used and now - a.wanted_at < PREFETCH_HOLD_S
                and self._wants.get(a.ref.key, 0) > 0)

    def _requeue(self, a: _Adapter) -> None:
        """`a` left every tier while requests still wait for it: load it again ahead of later
        arrivals (it came before them), once its known size fits beside the held entries."""
        key = a.ref.key
        if key in self._inflight or key in self._pending:
            return
        urgent = list(itertools.takewhile(lambda k: self._pending[k][1] or self._pending[k][2], self._pending))
        self._pending[key] = (a.ref, False, False)
        for k in (key, *reversed(urgent)):  # behind demanded loads and re-checks, which stay first
            self._pending.move_to_end(k, last=False)
        self._size_hint[key] = a.nbytes

    def _evict_host(self, keep: str) -> None:
        """LRU over entries no request waits for. The budget is a hard limit: if that is not enough
        (estimates of unknown sizes, loads `acquire` demanded), entries loaded ahead for waiting
        requests go too, the latest wanted first (the furthest back in line), and load again later."""
        now = time.monotonic()
        held = []
        for key in list(self._host_lru):
            if self._host_bytes <= self.config.adapter_host_bytes:
                return
            if key != keep:
                if self._wanted(self._adapters[key], now):
                    held.append(key)
                else:
                    self._drop_host(key)
        for key in sorted(held, key=lambda k: self._adapters[k].wanted_at, reverse=True):
            if self._host_bytes <= self.config.adapter_host_bytes:
                return
            a = self._drop_host(key)
            if not self._ready(key):  # not in a slot either
                self._requeue(a)

    def _drop_host(self, key: str) -> _Adapter:
        a = self._adapters[key]
        del self._host_lru[key]
        self._host_bytes -= a.nbytes
        a.weights = None
        if key not in self._slot_of:
            del self._adapters[key]
        self._tiers["host"].evictions += 1
        log.info("adapter_evicted", adapter=key, tier="host", bytes=a.nbytes)
        return a

    def _evict_disk(self, keep: str) -> None:
        for key in list(self._disk):
            if self._disk_bytes <= self.config.adapter_disk_bytes:
                return
            if key == keep or key in self._inflight:
                continue
            ref, nbytes = self._disk.pop(key)
            self._disk_bytes -= nbytes
            self.sources[ref.source].evict(ref.id)
            self._tiers["disk"].evictions += 1
            log.info("adapter_evicted", adapter=key, tier="disk", bytes=nbytes)

    # ---- loader threads ---------------------------------------------------------------------

    def _load(self, ref: AdapterRef, revalidate: bool) -> None:
        key, source = ref.key, self.sources[ref.source]
        t0 = time.perf_counter()
        disk_bytes, on_disk, unchanged, stamp, w = None, False, False, None, None
        try:
            stamp = source.stamp(ref.id)  # before reading: a change while we read is seen next time
            with self._lock:
                current = self._adapters.get(key)
                unchanged = revalidate and current is not None and current.stamp == stamp
            if not unchanged:
                with self._lock:
                    on_disk = key in self._disk
                path = source.fetch(ref.id, ref.api_token)
                if source.caches_on_disk:
                    disk_bytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                w = load_peft_adapter(path, self.spec, self.slots.dtype, self.slots.max_rank,
                                      self.config.allow_pickle, key=key)
                if self.slots.device.type == "cuda":
                    w = w.pin_memory()
            error = None
        except EngineError as e:
            error = e
        except Exception as e:  # out of memory, disk faults: not the adapter's fault
            error = EngineError(ErrorType.INTERNAL, f"adapter load failed: {type(e).__name__}: {e}", retryable=True)
        ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            del self._inflight[key]
            self._revalidating.discard(key)
            if error is not None and revalidate:  # keep serving the version we have
                log.warning("adapter_revalidate_failed", adapter=key, error=error.message)
            elif error is not None:
                self._fail(key, error)
            elif not unchanged:
                self._insert(ref, w, stamp, ms, disk_bytes, on_disk)
            self._start_loads()
        if self._on_settled is not None:
            self._on_settled()

    def _insert(self, ref: AdapterRef, w: AdapterWeights, stamp: Hashable | None, ms: float,
                disk_bytes: int | None, on_disk: bool) -> None:
        key, now = ref.key, time.monotonic()
        self._failures.pop(key, None)
        old = self._adapters.get(key)
        if old is not None and old.weights is not None:
            self._host_bytes -= old.nbytes
        self._generation += 1
        self._adapters[key] = _Adapter(ref, self._generation, stamp, now, now, ms, w.nbytes, w)
        self._host_lru[key] = None
        self._host_lru.move_to_end(key)
        self._host_bytes += w.nbytes
        self._loads += 1
        self._load_times.append(ms)
        if disk_bytes is not None:
            self._tiers["disk"].hits += on_disk
            self._tiers["disk"].misses += not on_disk
            if key in self._disk:
                self._disk_bytes -= self._disk.pop(key)[1]
            self._disk[key] = (ref, disk_bytes)
            self._disk_bytes += disk_bytes
            self._evict_disk(keep=key)
        log.info("adapter_loaded", adapter=key, ms=round(ms, 1), bytes=w.nbytes, rank=w.rank,
                 generation=self._generation, reloaded=old is not None)
        self._evict_host(keep=key)
