"""Who runs next: per-adapter waiting queues, fair admission, a KV block budget, preemption.

Iteration-level with chunked prefill (vLLM v1, Sarathi-Serve): a step packs every running row
that decodes (one token each) and then prompt chunks up to a token budget (max_batched_tokens):
first the prompts already being prefilled, oldest first, then newly admitted ones. A prompt longer
than what is left of the budget is split over steps, so an arriving job joins the running rows'
step instead of stalling them for a prefill of its own; finished sequences leave at once.

Fairness across adapters, in the spirit of LoRAX:
- At most `max_active` distinct adapters (adapter_max_active, else the device slot count) may admit
  requests, so a batch never needs more adapters than the device tier holds. The others wait in a
  rotation (FIFO by when they started waiting), skipped while their adapter is still loading.
- Time slice: once an adapter has been active `time_slice_steps` steps while a ready adapter waits
  for a place, it admits no more; when its running rows finish it leaves, and rejoins the back of
  the rotation if it still has requests. A hot adapter cannot hold its place forever.
- Within a step, free rows go to the active queue with the fewest running rows, oldest head first
  (max-min fair share), so 1000 queued jobs of one adapter cannot crowd out one job of another.
The base model (no adapter) needs no slot: it is always eligible and shares rows the same way.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

import structlog

from engine.config import EngineConfig
from engine.kv_cache import BlockManager
from engine.request import AdapterRef, EngineError
from engine.sequence import Sequence, SequenceStatus

log = structlog.get_logger(__name__)


class AdapterGate(Protocol):
    """What the scheduler needs from the adapter store (engine/adapter_store.py)."""

    def poll(self, ref: AdapterRef) -> Literal["ready", "loading"] | EngineError: ...
    def acquire(self, ref: AdapterRef) -> int | None: ...
    def release(self, ref: AdapterRef) -> None: ...


@dataclass
class Batch:
    """One step's rows. Each runs its next tokens from its num_computed_tokens on."""

    decode: list[Sequence]  # one token each: the newest output, whose K/V is not cached yet
    chunks: list[tuple[Sequence, int]]  # (sequence, tokens) of its prompt (and outputs, when recomputing)

    @property
    def rows(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens it runs this step), decode rows first."""
        return [(seq, 1) for seq in self.decode] + self.chunks

    @property
    def admitted(self) -> list[Sequence]:
        """Rows that start (or, preempted, restart) this step; read before the step runs."""
        return [seq for seq, _ in self.chunks if seq.num_computed_tokens == 0]


@dataclass
class ScheduleOutcome:
    batch: Batch | None  # None: nothing can run this step
    failed: list[tuple[Sequence, EngineError]] = field(default_factory=list)  # answer these now


@dataclass
class _Active:
    since_step: int
    draining: bool = False  # its time slice is over: admits nothing more, leaves when its rows finish


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, adapters: AdapterGate | None) -> None:
        self.max_batch = config.max_batch
        self.max_batched_tokens = config.max_batched_tokens
        self.max_active = config.adapter_max_active or config.adapter_slots
        self.time_slice_steps = config.adapter_time_slice_steps
        self.blocks = blocks
        self.adapters = adapters
        self.queues: dict[str | None, deque[Sequence]] = {}  # adapter key (None: base) -> waiting, oldest first
        self.running: list[Sequence] = []  # admission order: newest last (the one preempted first)
        self.num_running_by_key: dict[str | None, int] = {}
        self.active: dict[str, _Active] = {}  # adapters that may admit
        self.rotation: deque[str] = deque()  # adapters waiting for an active place, FIFO
        self.num_waiting = 0  # a counter, so other threads can read it while queues change
        self.steps = 0
        self.num_preemptions = 0
        self._tiebreak = itertools.count()

    # ---- queue bookkeeping --------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._queue(seq.adapter_key).append(seq)
        self.num_waiting += 1

    def _queue(self, key: str | None) -> deque[Sequence]:
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
            if key is not None and key not in self.active:
                self.rotation.append(key)
        return queue

    def _drop_queue_if_empty(self, key: str | None) -> None:
        if key in self.queues and not self.queues[key]:
            del self.queues[key]
            if key is not None and key in self.rotation:
                self.rotation.remove(key)

    def waiting(self) -> list[Sequence]:
        return [seq for queue in self.queues.values() for seq in queue]

    def remove_waiting(self, seq: Sequence) -> None:
        self.queues[seq.adapter_key].remove(seq)
        self.num_waiting -= 1
        self._drop_queue_if_empty(seq.adapter_key)

    # ---- running bookkeeping ------------------------------------------------------------------

    def _admit(self, seq: Sequence, key: str | None, slot: int) -> None:
        self.queues[key].popleft()
        self.num_waiting -= 1
        self._drop_queue_if_empty(key)
        self.blocks.allocate(seq)
        seq.adapter_slot = slot
        seq.status = SequenceStatus.RUNNING
        if seq.admitted_at is None:
            seq.admitted_at = time.time()
        self.running.append(seq)
        self.num_running_by_key[key] = self.num_running_by_key.get(key, 0) + 1

    def _release(self, seq: Sequence) -> None:
        """Give back what a running sequence holds: KV blocks and its adapter pin."""
        self.running.remove(seq)
        self.blocks.deallocate(seq)
        key = seq.adapter_key
        self.num_running_by_key[key] -= 1
        if seq.request.adapter is not None and self.adapters is not None:
            self.adapters.release(seq.request.adapter)
        seq.adapter_slot = -1

    def finish(self, seq: Sequence) -> None:
        """A running sequence is done (finished, failed or cancelled)."""
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def preempt(self, seq: Sequence) -> None:
        """Free its blocks; it goes back to the front of its queue and recomputes later."""
        self._release(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        key = seq.adapter_key
        self._queue(key).appendleft(seq)
        self.num_waiting += 1
        seq.status = SequenceStatus.WAITING
        log.info("sequence_preempted", request_id=seq.request_id, tokens=seq.num_tokens,
                 free_blocks=self.blocks.num_free)

    # ---- the policy ---------------------------------------------------------------------------

    def schedule(self) -> ScheduleOutcome:
        """Decode rows first (always all of them), then prompt chunks within what is left of the
        token budget: the prompts already started, then newly admitted ones. Nothing is admitted in
        a step that had to preempt (blocks ran short: it would only be preempted again)."""
        self.steps += 1
        outcome = ScheduleOutcome(batch=None)
        self._rotate(outcome.failed)
        preemptions = self.num_preemptions
        decode = self._reserve_decode()
        budget = self.max_batched_tokens - len(decode)
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.running:  # prompts being prefilled over several steps, oldest first
            if not seq.is_decoding and budget > 0:
                chunks.append((seq, min(seq.num_uncomputed_tokens, budget)))
                budget -= chunks[-1][1]
        if self.num_preemptions == preemptions:
            chunks += self._admit_waiting(outcome.failed, budget)
        if decode or chunks:
            outcome.batch = Batch(decode, chunks)
        return outcome

    def _poll(self, key: str, failed: list[tuple[Sequence, EngineError]]) -> bool:
        """Is the adapter ready? A failed adapter fails every request queued for it."""
        if self.adapters is None:
            return True
        ref = self.queues[key][0].request.adapter
        assert ref is not None, "adapter queues hold requests with that adapter"
        state = self.adapters.poll(ref)
        if isinstance(state, EngineError):
            for seq in self.queues.pop(key):
                failed.append((seq, state))
                self.num_waiting -= 1
            if key in self.rotation:
                self.rotation.remove(key)
            return False
        return state == "ready"

    def _rotate(self, failed: list[tuple[Sequence, EngineError]]) -> None:
        """Retire idle or drained adapters, end expired time slices, activate waiting adapters."""
        for key in list(self.active):
            if self.num_running_by_key.get(key, 0) == 0 and (self.active[key].draining or key not in self.queues):
                del self.active[key]
                if key in self.queues:
                    self.rotation.append(key)
        ready = self._ready_in_rotation(failed)
        if ready and len(self.active) >= self.max_active:
            for key, state in self.active.items():
                if not state.draining and self.steps - state.since_step >= self.time_slice_steps:
                    state.draining = True
                    log.info("adapter_time_slice_over", adapter=key, steps=self.steps - state.since_step)
        for key in ready:
            if len(self.active) >= self.max_active:
                break
            self.rotation.remove(key)
            self.active[key] = _Active(since_step=self.steps)

    def _ready_in_rotation(self, failed: list[tuple[Sequence, EngineError]]) -> list[str]:
        """Ready adapters from the front of the rotation, skipping ones still loading. Only the
        front is polled, to bound the work per step (polling queues a load like a prefetch would,
        behind the ones already queued; it does not move it ahead)."""
        wanted = max(self.max_active - len(self.active), 1)
        ready: list[str] = []
        for key in list(self.rotation)[:2 * self.max_active]:
            if self._poll(key, failed):
                ready.append(key)
                if len(ready) >= wanted:
                    break
        return ready

    def _admit_waiting(self, failed: list[tuple[Sequence, EngineError]], budget: int) -> list[tuple[Sequence, int]]:
        """Fill free rows from eligible queues, fewest running rows first, then oldest head, while
        the step's token budget lasts; each admitted row's first chunk takes what it can of it. A
        row takes the KV blocks of all its tokens at once: a prompt is never stuck half-prefilled."""
        eligible: list[str | None] = [k for k in self.active if not self.active[k].draining and k in self.queues]
        if None in self.queues:
            eligible.append(None)
        heap = [self._priority(k) for k in eligible]
        heapq.heapify(heap)
        admitted: list[tuple[Sequence, int]] = []
        while heap and len(self.running) < self.max_batch and budget > 0:
            *_, key = heapq.heappop(heap)
            if key is not None and not self._poll(key, failed):
                continue  # loading again (e.g. evicted from host RAM), or failed: others go on
            seq = self.queues[key][0]
            if not self.blocks.can_allocate(seq):  # strict order: a long prompt is not overtaken forever
                break
            slot = -1
            if seq.request.adapter is not None and self.adapters is not None:
                acquired = self.adapters.acquire(seq.request.adapter)
                if acquired is None:
                    continue  # every device slot is pinned: this adapter waits, others go on
                slot = acquired
            self._admit(seq, key, slot)
            admitted.append((seq, min(seq.num_tokens, budget)))
            budget -= admitted[-1][1]
            if key in self.queues:
                heapq.heappush(heap, self._priority(key))
        return admitted

    def _priority(self, key: str | None) -> tuple[int, float, int, str | None]:
        return (self.num_running_by_key.get(key, 0), self.queues[key][0].arrival_time, next(self._tiebreak), key)

    def _reserve_decode(self) -> list[Sequence]:
        """The running rows whose prompt is computed, each with room for its newest token's K/V;
        the newest running row is preempted while blocks run short."""
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding:
                continue  # preempted below on behalf of an older sequence, or prefilling
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
        return [seq for seq in self.running if seq.is_decoding]
