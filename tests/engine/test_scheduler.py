"""Scheduler policy with fakes: admission limits, adapter readiness, fair sharing, bounded active
adapters with time slices, preemption, steps that mix decode rows with prompt chunks under a token
budget. No model: a tiny driver plays the engine's part."""

from __future__ import annotations

import itertools

from engine.config import EngineConfig
from engine.kv_cache import BlockManager
from engine.request import AdapterRef, EngineError, ErrorType, GenerationRequest, SamplingParams
from engine.scheduler import Batch, Scheduler
from engine.sequence import Sequence, SequenceStatus

_clock = itertools.count()


class FakeGate:
    """Adapter store stand-in: per-adapter state, `num_slots` device slots, pin counts."""

    def __init__(self, num_slots: int = 4, states: dict[str, object] | None = None) -> None:
        self.num_slots = num_slots
        self.states = dict(states or {})  # adapter id -> "ready" | "loading" | EngineError
        self.pins: dict[str, int] = {}
        self.slot_of: dict[str, int] = {}
        self.refuse: set[str] = set()  # acquire returns None for these

    def poll(self, ref: AdapterRef):
        return self.states.get(ref.id, "ready")

    def acquire(self, ref: AdapterRef) -> int | None:
        if ref.id in self.refuse:
            return None
        if ref.id not in self.slot_of:
            used = {self.slot_of[k] for k, n in self.pins.items() if n > 0}
            free = [s for s in range(self.num_slots) if s not in used]
            if not free:
                return None
            for k in [k for k, s in self.slot_of.items() if s == free[0]]:
                del self.slot_of[k]
            self.slot_of[ref.id] = free[0]
        self.pins[ref.id] = self.pins.get(ref.id, 0) + 1
        return self.slot_of[ref.id]

    def release(self, ref: AdapterRef) -> None:
        assert self.pins.get(ref.id, 0) > 0, f"release without acquire: {ref.id}"
        self.pins[ref.id] -= 1


def make_seq(adapter: str | None = None, prompt: int = 4, new: int = 3) -> Sequence:
    ids = [5] * prompt
    request = GenerationRequest(id=f"r{next(_clock)}", prompt_token_ids=ids,
                                adapter=AdapterRef(adapter) if adapter else None,
                                params=SamplingParams(max_new_tokens=new))
    request.arrival_time = float(next(_clock))  # strictly increasing, independent of wall time
    return Sequence(request, list(ids), prompt)


def make_scheduler(gate=None, blocks=1000, block_size=4, **config) -> Scheduler:
    return Scheduler(EngineConfig(**config), BlockManager(blocks, block_size), gate)


def run_batch(sched: Scheduler) -> tuple[Batch | None, list]:
    """One engine step: schedule, run each row's tokens, give a token to each row that reached its
    end, finish rows at max_new_tokens. Returns the batch (None: nothing ran) and the failed."""
    outcome = sched.schedule()
    for seq, n in outcome.batch.rows if outcome.batch else []:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.max_new_tokens:
                sched.finish(seq)
    return outcome.batch, outcome.failed


def run_step(sched: Scheduler) -> tuple[list[tuple[Sequence, int]], list]:
    """`run_batch`, as the (sequence, tokens) rows and the failed."""
    batch, failed = run_batch(sched)
    return (batch.rows if batch else []), failed


def step(sched: Scheduler) -> tuple[list[Sequence], bool, list]:
    """`run_batch`, as the rows' sequences, whether a prompt chunk ran, and the failed."""
    batch, failed = run_batch(sched)
    return ([seq for seq, _ in batch.rows], bool(batch.chunks), failed) if batch else ([], False, failed)


def test_rows_limited_by_max_batch_size_and_join_every_step():
    sched = make_scheduler(max_batch=3)
    seqs = [make_seq(new=2) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    batch, prefill, _ = step(sched)
    assert prefill and batch == seqs[:3]
    batch, prefill, _ = step(sched)  # nothing admissible: the three decode and finish
    assert not prefill and batch == seqs[:3] and not sched.running
    batch, prefill, _ = step(sched)  # freed rows are refilled at the next step
    assert prefill and batch == seqs[3:]


def test_prompt_chunks_fill_the_token_budget_after_the_decode_rows():
    sched = make_scheduler(max_batched_tokens=25, max_batch=4)
    small = [make_seq(prompt=10, new=5) for _ in range(3)]
    for s in small:
        sched.add(s)
    assert run_step(sched)[0] == [(small[0], 10), (small[1], 10), (small[2], 5)]  # the third is split
    assert small[2].num_output_tokens == 0 and small[2].num_uncomputed_tokens == 5
    big = make_seq(prompt=40)
    sched.add(big)
    # decode rows first, then the prompt already started, then the new one takes what is left
    assert run_step(sched)[0] == [(small[0], 1), (small[1], 1), (small[2], 5), (big, 18)]
    assert run_step(sched)[0] == [(small[0], 1), (small[1], 1), (small[2], 1), (big, 22)]
    assert big.num_output_tokens == 1 and big.num_computed_tokens == 40
    assert run_step(sched)[0] == [(s, 1) for s in (*small, big)]


def test_long_prompt_split_over_steps_while_running_rows_decode():
    """An arriving long prompt does not stall the running rows: every step still decodes them."""
    sched = make_scheduler(max_batched_tokens=16, max_batch=4)
    running = [make_seq(prompt=3, new=20), make_seq("a", prompt=5, new=20)]
    for s in running:
        sched.add(s)
    run_step(sched)
    long = make_seq("b", prompt=50, new=2)
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        rows, _ = run_step(sched)
        assert rows[:2] == [(running[0], 1), (running[1], 1)]  # decoding every step
        assert rows[2][0] is long
        chunks.append(rows[2][1])
    assert chunks == [14, 14, 14, 8] and sum(chunks) == long.num_prompt_tokens
    assert long.num_computed_tokens == 50 and len(long.block_table) == sched.blocks.blocks_for(51)
    assert run_step(sched)[0] == [(running[0], 1), (running[1], 1), (long, 1)]


def test_budget_of_a_step_counts_every_decode_row():
    sched = make_scheduler(max_batched_tokens=4, max_batch=4)
    rows = [make_seq(prompt=1, new=10) for _ in range(4)]
    for s in rows:
        sched.add(s)
    assert run_step(sched)[0] == [(s, 1) for s in rows]
    late = make_seq(prompt=3)
    sched.add(late)
    assert run_step(sched)[0] == [(s, 1) for s in rows]  # max_batch rows: it waits
    assert late.status is SequenceStatus.WAITING


def test_admits_nothing_in_a_step_that_preempted():
    sched = make_scheduler(FakeGate(), blocks=3, block_size=4, max_batch=4)
    old, new = make_seq(prompt=4, new=10), make_seq(prompt=4, new=10)
    sched.add(old)
    sched.add(new)
    run_step(sched)
    other = make_seq("x", prompt=1)  # its own queue, and one block would hold it
    sched.add(other)
    rows, _ = run_step(sched)  # both need a second block, one is free: the newest, new, is preempted
    assert rows == [(old, 1)] and new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert other.status is SequenceStatus.WAITING and sched.blocks.num_free == 1
    assert run_step(sched)[0] == [(old, 1), (other, 1)]  # admission again in the next step


def test_preempted_prefill_restarts_from_its_first_token():
    sched = make_scheduler(blocks=6, block_size=4, max_batched_tokens=4, max_batch=2)
    old = make_seq(prompt=4, new=30)
    sched.add(old)
    run_step(sched)
    long = make_seq(prompt=16)
    sched.add(long)  # its 4 blocks taken at once; prefilled 3 tokens a step beside old's decode row
    for _ in range(4):
        rows, _ = run_step(sched)
        assert rows == [(old, 1), (long, 3)]
    assert long.num_computed_tokens == 12 and sched.blocks.num_free == 0
    rows, _ = run_step(sched)  # old's 9th token needs a third block: the newest row, long, is preempted
    assert rows == [(old, 1)] and long.status is SequenceStatus.WAITING and long.num_computed_tokens == 0
    sched.finish(old)
    assert run_step(sched)[0] == [(long, 4)]  # readmitted: its prompt from token 0 again


def test_kv_blocks_limit_admission_in_order():
    sched = make_scheduler(blocks=4, block_size=4)
    long, short = make_seq(prompt=12), make_seq(prompt=4)
    first = make_seq(prompt=8)
    for s in (first, long, short):
        sched.add(s)
    batch, _, _ = step(sched)
    # `long` (3 blocks) does not fit beside `first` (2); `short` waits behind it, not around it
    assert batch == [first]
    assert sched.blocks.num_used == 2 and sched.num_waiting == 2


def test_loading_adapter_waits_without_blocking_others():
    gate = FakeGate(states={"slow": "loading"})
    sched = make_scheduler(gate)
    slow, fast, base = make_seq("slow"), make_seq("fast"), make_seq(None)
    for s in (slow, fast, base):
        sched.add(s)
    batch, _, _ = step(sched)
    assert set(batch) == {fast, base}
    assert slow.status is SequenceStatus.WAITING
    gate.states["slow"] = "ready"
    batch, prefill, _ = step(sched)
    assert prefill and batch == [fast, base, slow]  # it joins their decode step


def test_failed_adapter_fails_its_requests_only():
    error = EngineError(ErrorType.ADAPTER_NOT_FOUND, "no such adapter")
    gate = FakeGate(states={"bad": error})
    sched = make_scheduler(gate)
    bad1, bad2, good = make_seq("bad"), make_seq("bad"), make_seq("good")
    for s in (bad1, good, bad2):
        sched.add(s)
    batch, _, failed = step(sched)
    assert batch == [good]
    assert [(s, e) for s, e in failed] == [(bad1, error), (bad2, error)]
    assert sched.num_waiting == 0


def test_no_free_slot_waits_and_others_go_on():
    gate = FakeGate(num_slots=1)
    sched = make_scheduler(gate, adapter_slots=2)
    a, b, base = make_seq("a", new=2), make_seq("b", new=2), make_seq(None, new=2)
    for s in (a, b, base):
        sched.add(s)
    batch, _, _ = step(sched)
    assert set(batch) == {a, base}  # b's acquire returned None: it waits
    step(sched)  # decode: a finishes and releases its slot
    assert gate.pins["a"] == 0
    batch, prefill, _ = step(sched)
    assert prefill and batch == [b] and b.adapter_slot == 0


def test_slots_released_on_finish_and_slot_numbers_set():
    gate = FakeGate(num_slots=4)
    sched = make_scheduler(gate)
    seqs = [make_seq("a", new=1), make_seq("b", new=1), make_seq("a", new=1)]
    for s in seqs:
        sched.add(s)
    batch, _, _ = step(sched)  # max_new_tokens 1: all finish in their prefill step
    assert len(batch) == 3
    assert seqs[0].adapter_slot == -1  # cleared when it finished
    assert gate.pins == {"a": 0, "b": 0}
    assert sched.blocks.num_used == 0 and not sched.running


def test_fair_share_one_hot_adapter_cannot_crowd_out_cold_ones():
    gate = FakeGate(num_slots=32)
    sched = make_scheduler(gate, max_batch=8)
    hot = [make_seq("hot") for _ in range(100)]  # all older than every cold request
    cold = [make_seq(f"cold{i}") for i in range(5)]
    for s in hot + cold:
        sched.add(s)
    batch, _, _ = step(sched)
    assert set(cold) <= set(batch)
    assert sum(s in hot for s in batch) == 3


def test_active_adapters_bounded_and_time_slices_rotate():
    gate = FakeGate(num_slots=2)
    sched = make_scheduler(gate, max_batch=4, adapter_slots=2, adapter_time_slice_steps=5)
    queues = {name: [make_seq(name, new=3) for _ in range(30)] for name in "abcd"}
    for i in range(30):
        for name in "abcd":
            sched.add(queues[name][i])
    served_by_step = []
    for _ in range(400):
        batch, _, _ = step(sched)
        distinct = {s.adapter_key for s in sched.running}
        assert len(distinct) <= 2, distinct
        served_by_step.append({s.adapter_key for s in batch})
        if not sched.running and not sched.num_waiting:
            break
    assert not sched.num_waiting and not sched.running
    # c and d (waiting for a place behind a and b) got one long before a and b drained
    first_step = {k: next(i for i, keys in enumerate(served_by_step) if k in keys)
                  for k in ("local:c", "local:d")}
    last_a = max(i for i, keys in enumerate(served_by_step) if "local:a" in keys)
    assert max(first_step.values()) < last_a / 3


def test_hot_flood_cold_jobs_finish_first():
    """Issue 4's scenario: 1000 jobs for one adapter, then 20 cold adapters with one job each,
    8 device slots. Every cold job completes long before the hot queue drains."""
    gate = FakeGate(num_slots=8)
    sched = make_scheduler(gate, max_batch=16, adapter_slots=8, adapter_time_slice_steps=16)
    hot = [make_seq("hot", new=4) for _ in range(1000)]
    cold = [make_seq(f"cold{i}", new=4) for i in range(20)]
    for s in hot + cold:
        sched.add(s)
    finished_at = {}
    done = 0
    while sched.running or sched.num_waiting:
        batch, _, _ = step(sched)
        for s in batch:
            if s.status is SequenceStatus.FINISHED:
                finished_at[s] = done
                done += 1
    last_cold = max(finished_at[s] for s in cold)
    assert last_cold < 200, last_cold  # of 1020 completions


def test_decode_preempts_newest_when_blocks_run_out():
    gate = FakeGate()
    sched = make_scheduler(gate, blocks=3, block_size=4)
    old, new = make_seq("a", prompt=4, new=10), make_seq(None, prompt=4, new=10)
    sched.add(old)
    sched.add(new)
    batch, prefill, _ = step(sched)
    assert prefill and batch == [old, new] and sched.blocks.num_free == 1
    # both now hold 5 tokens: each needs a second block, only one is free
    batch, prefill, _ = step(sched)
    assert not prefill and batch == [old]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_preemptions == 1
    assert sched.queues[None][0] is new  # front of its queue, recomputed later with its outputs
    assert new.num_tokens == 5
    assert sched.num_preemptions == 1
    assert gate.pins["a"] == 1


def test_preempted_adapter_sequence_releases_its_slot():
    gate = FakeGate()
    sched = make_scheduler(gate, blocks=2, block_size=4)
    old, new = make_seq(None, prompt=4, new=10), make_seq("b", prompt=4, new=10)
    sched.add(old)
    sched.add(new)
    step(sched)
    step(sched)  # new is preempted
    assert new.status is SequenceStatus.WAITING and gate.pins["b"] == 0 and new.adapter_slot == -1


def test_remove_waiting_and_finish():
    sched = make_scheduler()
    a, b = make_seq("x"), make_seq("x")
    sched.add(a)
    sched.add(b)
    sched.remove_waiting(a)
    assert sched.waiting() == [b]
    sched.remove_waiting(b)
    assert sched.num_waiting == 0 and not sched.queues


def test_only_the_front_of_the_rotation_is_polled():
    """Polling asks the store to load now; adapters far back in the rotation are left to prefetch."""
    gate = FakeGate(num_slots=2, states={f"a{i}": "loading" for i in range(10)})
    polled = []
    poll = gate.poll
    gate.poll = lambda ref: polled.append(ref.id) or poll(ref)
    sched = make_scheduler(gate, adapter_slots=2)
    for i in range(10):
        sched.add(make_seq(f"a{i}"))
    assert step(sched)[0] == []
    assert set(polled) == {"a0", "a1", "a2", "a3"}
    gate.states["a7"] = "ready"  # a ready adapter behind loading ones is not seen until it nears the front
    assert step(sched)[0] == []
    gate.states.update({"a0": "ready", "a2": "ready"})
    batch, _, _ = step(sched)
    assert {s.adapter_key for s in batch} == {"local:a0", "local:a2"}
