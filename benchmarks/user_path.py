"""The user-path scenarios (issue 12) that `loraq bench e2e` runs (benchmarks/e2e.py): loraq as a
backend app sees it, through the broker, every job published one after another as a client
publishes them, each awaiting its publisher confirm; against a naive PEFT + aio-pika worker
(benchmarks/naive_worker.py) on the same jobs.

Bursts: a cell is a system and k, the distinct adapters its jobs cycle through. A cell's burst is
the run's --jobs jobs published one by one, job i on adapter i mod k (k = 0: the base model), their
results awaited together; tokens/s from the first publish to the last result. Each cell the chosen
scenarios need runs once: a warm-up round of every cell off the clock (2 tokens: adapter loads,
first calls), then --repeats rounds with the cells taking turns, ordered by k so that the systems
alternate, every other round in reverse, so that drifting background load hits all alike.

Rotation: one job at a time (publish, await the result, next) over cold adapters (just written, so
their files are in the page cache, never loaded), adapters in rotation within each set; the systems
take turns job by job. Sets run one after another: interleaved, one set's adapters would evict
another's from loraq's host tier.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.common import percentile, progress

say = partial(progress, "e2e")
JOB_TIMEOUT_S = 900.0
STRIDE = 37  # rotation order: consecutive jobs never share an adapter (coprime with the set sizes used)
LORAQ = "loraq"  # the system under test; the others are naive PEFT workers
PEFT_BATCH = "peft-batch"  # benchmarks/naive_worker.py --batch: mixed-adapter `generate` batches
PEFT_SERIAL = "peft-serial"  # benchmarks/naive_worker.py: one job at a time


@dataclass(frozen=True)
class Target:
    """Where a worker takes jobs: the loraq exchange and routing key, or the naive worker's queue
    through the default exchange."""

    name: str
    exchange: str
    routing_key: str


@dataclass
class Reply:
    sent: float  # perf_counter before the publish
    received: float
    body: dict[str, Any]

    @property
    def latency_ms(self) -> float:
        return (self.received - self.sent) * 1e3

    @property
    def tokens(self) -> int:
        return int(self.body["details"]["generated_tokens"])


class Publisher:
    """One connection with publisher confirms and an exclusive reply queue: a backend app."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._waiting: dict[str, tuple[float, asyncio.Future[Reply]]] = {}

    async def __aenter__(self) -> Publisher:
        self._connection = await aio_pika.connect_robust(self.url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._replies = await self._channel.declare_queue(exclusive=True)
        await self._replies.consume(self._on_reply, no_ack=True)
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {"": self._channel.default_exchange}
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._connection.close()

    async def publish(self, target: Target, inputs: str, adapter: str | None,
                      new_tokens: int) -> asyncio.Future[Reply]:
        """Publish one job and await its confirm; the future holds its final reply."""
        if target.exchange not in self._exchanges:
            self._exchanges[target.exchange] = await self._channel.get_exchange(target.exchange, ensure=False)
        job_id = uuid.uuid4().hex
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        body = {"v": 1, "inputs": inputs,
                "parameters": {"adapter_id": adapter, "max_new_tokens": new_tokens, "ignore_eos_token": True}}
        self._waiting[job_id] = (time.perf_counter(), future)
        message = aio_pika.Message(json.dumps(body).encode(), content_type="application/json", message_id=job_id,
                                   correlation_id=job_id, reply_to=self._replies.name,
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await self._exchanges[target.exchange].publish(message, routing_key=target.routing_key)
        return future

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if message.type == "token":
            return
        sent, future = self._waiting.pop(message.correlation_id or "", (0.0, None))
        if future is None or future.done():
            return
        body = json.loads(message.body)
        if message.type != "result":
            future.set_exception(RuntimeError(f"a job failed: {message.type} {body}"))
        else:
            future.set_result(Reply(sent, time.perf_counter(), body))


Jobs = list[tuple[str, str | None]]  # (prompt, adapter id or None)
Cell = tuple[Target, int]  # a system and k, the distinct adapters its burst's jobs cycle through


@dataclass
class Burst:
    """Jobs published one after another, results awaited together."""

    wall_s: float  # first publish -> last result
    replies: list[Reply] = field(repr=False)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.replies)

    @property
    def texts(self) -> list[str]:
        return [r.body["generated_text"] for r in self.replies]


Bursts = dict[tuple[str, int], list[Burst]]  # (system name, k) -> its timed bursts, round by round


async def burst(publisher: Publisher, target: Target, jobs: Jobs, new_tokens: int, gap_ms: float) -> Burst:
    """Publish `jobs` one by one (each after the previous one's confirm, `gap_ms` apart), then await
    every result."""
    start = time.perf_counter()
    futures = []
    for i, (prompt, adapter) in enumerate(jobs):
        if gap_ms and i:
            await asyncio.sleep(gap_ms / 1e3)
        futures.append(await publisher.publish(target, prompt, adapter, new_tokens))
    replies = await asyncio.wait_for(asyncio.gather(*futures), JOB_TIMEOUT_S)
    return Burst(max(r.received for r in replies) - start, list(replies))


def tokens_per_s(bursts: Sequence[Burst]) -> float:
    """Tokens over seconds, all the bursts together."""
    return sum(b.tokens for b in bursts) / sum(b.wall_s for b in bursts)


def cell_jobs(prompts: Sequence[str], adapters: Sequence[str], jobs: int, k: int) -> Jobs:
    """`jobs` jobs, job i on prompt i and on adapter i mod k (k = 0: the base model)."""
    return [(prompts[i], adapters[i % k] if k else None) for i in range(jobs)]


def describe(k: int) -> str:
    """k for people: "base model", "1 adapter", "4 adapters"."""
    return "base model" if k == 0 else f"{k} adapter{'s' if k > 1 else ''}"


# ---- the runs ------------------------------------------------------------------------------------

def cells(scenarios: Sequence[str], targets: dict[str, Target], jobs: int, ks: Sequence[int]) -> list[Cell]:
    """The cells the scenarios need, each once, ordered by k then system (so the systems take turns):
    staggered loraq on the base model and on `jobs` adapters; sweep loraq and the batching PEFT
    worker on each k of `ks`; naive all three systems on `jobs` adapters."""
    wanted: set[tuple[str, int]] = set()
    if "staggered" in scenarios:
        wanted |= {(LORAQ, 0), (LORAQ, jobs)}
    if "sweep" in scenarios:
        wanted |= {(name, k) for k in ks for name in (LORAQ, PEFT_BATCH)}
    if "naive" in scenarios:
        wanted |= {(name, jobs) for name in (LORAQ, PEFT_SERIAL, PEFT_BATCH)}
    return [(targets[name], k) for name, k in sorted(wanted, key=lambda cell: (cell[1], cell[0]))]


async def run_bursts(publisher: Publisher, cells: Sequence[Cell], prompts: Sequence[str], adapters: Sequence[str],
                     jobs: int, new_tokens: int, gap_ms: float, repeats: int) -> Bursts:
    """Every cell once off the clock, then `repeats` rounds of every cell, taking turns."""
    say(f"bursts: a warm-up round of {len(cells)} cells (adapter loads, first calls), off the clock")
    for target, k in cells:
        await burst(publisher, target, cell_jobs(prompts, adapters, jobs, k), 2, 0.0)
    out: Bursts = {(target.name, k): [] for target, k in cells}
    for rep in range(repeats):
        for i, (target, k) in enumerate(cells if rep % 2 == 0 else cells[::-1]):
            b = await burst(publisher, target, cell_jobs(prompts, adapters, jobs, k), new_tokens, gap_ms)
            out[target.name, k].append(b)
            say(f"bursts: round {rep + 1}/{repeats}, cell {i + 1}/{len(cells)}, {target.name} on {describe(k)}: "
                f"{b.tokens} tokens in {b.wall_s:.2f} s ({b.tokens / b.wall_s:.1f} tok/s)")
    return out


async def run_rotation(publisher: Publisher, targets: Sequence[Target], sets: dict[int, list[str]],
                       prompts: Sequence[str], jobs: int, new_tokens: int) -> dict[str, dict[int, list[Reply]]]:
    """`jobs` jobs one at a time per system over each set, adapters in rotation, the systems taking
    turns job by job; the replies per system and set size."""
    out: dict[str, dict[int, list[Reply]]] = {t.name: {} for t in targets}
    step = max(1, jobs // 5)
    for n, names in sets.items():
        for t in targets:
            out[t.name][n] = []
        for i in range(jobs):
            prompt, adapter = prompts[i % len(prompts)], names[(STRIDE * i) % n]
            for t in targets:
                future = await publisher.publish(t, prompt, adapter, new_tokens)
                out[t.name][n].append(await asyncio.wait_for(future, JOB_TIMEOUT_S))
            if (i + 1) % step == 0 or i + 1 == jobs:
                say(f"rotation over {n}: {i + 1}/{jobs} jobs on each of {', '.join(t.name for t in targets)}")
    return out


# ---- reports: each gives its numbers (the --json); the sweep and rotation also a table -----------

def staggered_numbers(bursts: Bursts, jobs: int) -> dict[str, Any]:
    """loraq's tokens/s on `jobs` distinct adapters against the base model, and their ratio (also per round)."""
    base, adapters = bursts[LORAQ, 0], bursts[LORAQ, jobs]
    per_round = [(a.tokens / a.wall_s) / (b.tokens / b.wall_s) for a, b in zip(adapters, base, strict=True)]
    return {"base_tok_s": round(tokens_per_s(base), 2), "adapters_tok_s": round(tokens_per_s(adapters), 2),
            "ratio": round(tokens_per_s(adapters) / tokens_per_s(base), 3),
            "ratio_per_round": [round(r, 3) for r in per_round]}


def naive_numbers(bursts: Bursts, jobs: int) -> dict[str, Any]:
    """loraq's tokens/s on `jobs` distinct adapters against each naive PEFT worker's, their ratios,
    and how many greedy texts agree (last round)."""
    loraq = bursts[LORAQ, jobs]
    numbers: dict[str, Any] = {"loraq_tok_s": round(tokens_per_s(loraq), 2)}
    for name in (PEFT_SERIAL, PEFT_BATCH):
        peft = bursts[name, jobs]
        same = sum(a == b for a, b in zip(loraq[-1].texts, peft[-1].texts, strict=True))
        numbers[name] = {"tok_s": round(tokens_per_s(peft), 2),
                         "ratio": round(tokens_per_s(loraq) / tokens_per_s(peft), 3),
                         "identical_texts": f"{same}/{len(peft[-1].texts)}"}
    return numbers


def report_sweep(bursts: Bursts, ks: Sequence[int], jobs: int, new_tokens: int,
                 adapters_text: str) -> tuple[list[str], dict[str, Any]]:
    """Tokens/s per k on loraq and the batching PEFT worker: the table and the numbers."""
    tok_s = {name: {str(k): round(tokens_per_s(bursts[name, k]), 2) for k in ks} for name in (LORAQ, PEFT_BATCH)}
    lines = [f"tokens/s: {jobs} jobs x {new_tokens} new tokens published one by one, job i on adapter i mod k "
             f"({adapters_text})",
             f"  {'k':>10s} {'loraq':>9s} {'PEFT batch':>11s} {'loraq / PEFT':>13s}"]
    for k in ks:
        ours, peft = tok_s[LORAQ][str(k)], tok_s[PEFT_BATCH][str(k)]
        lines.append(f"  {'0 (base)' if k == 0 else str(k):>10s} {ours:9.1f} {peft:11.1f} {ours / peft:13.2f}")
    return lines, {"jobs": jobs, "new_tokens": new_tokens, "adapters": adapters_text, "tok_s": tok_s}


def report_rotation(replies: dict[str, dict[int, list[Reply]]], new_tokens: int,
                    adapters_text: str) -> tuple[list[str], dict[str, Any]]:
    """p50/p99 latency per system and set size, the largest set's p50 over the smallest's, and
    loraq's own queue_ms and adapter_load_ms medians (its replies' timings): the table and the numbers."""
    systems: dict[str, Any] = {}
    for name, by_set in replies.items():
        sets = {}
        for n, rs in by_set.items():
            latencies = [r.latency_ms for r in rs]
            row = {"jobs": len(rs), "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}
            if all("timings" in r.body for r in rs):
                for timing in ("queue_ms", "adapter_load_ms"):
                    row[f"{timing}_p50"] = percentile([float(r.body["timings"][timing]) for r in rs], 50)
            sets[str(n)] = {k: round(v, 2) for k, v in row.items()}
        systems[name] = {"sets": sets}
        smallest, largest = str(min(by_set)), str(max(by_set))
        if largest != smallest:
            systems[name]["p50_ratio"] = round(sets[largest]["p50_ms"] / sets[smallest]["p50_ms"], 3)
    ours, peft = systems[LORAQ]["sets"], systems[PEFT_SERIAL]["sets"]
    jobs = next(iter(ours.values()))["jobs"]
    lines = [f"latency, one job at a time: {new_tokens} new tokens, cold {adapters_text} in rotation, "
             f"{jobs} jobs per set and system",
             f"  {'adapters':>8s} {'loraq p50':>10s} {'p99':>7s} {'queue_ms':>8s} {'adapter_load_ms':>15s} "
             f"{'PEFT p50':>9s} {'p99':>7s} {'PEFT / loraq p50':>16s}"]
    lines += [f"  {n:>8s} {row['p50_ms']:10.1f} {row['p99_ms']:7.1f} {row['queue_ms_p50']:8.1f} "
              f"{row['adapter_load_ms_p50']:15.1f} {peft[n]['p50_ms']:9.1f} {peft[n]['p99_ms']:7.1f} "
              f"{peft[n]['p50_ms'] / row['p50_ms']:16.2f}" for n, row in ours.items()]
    lines.append("  queue_ms, adapter_load_ms: the loraq worker's own timings in its replies (medians); "
                 "PEFT: the naive worker, one job at a time, loading each adapter on first use and keeping it")
    return lines, {"jobs": jobs, "new_tokens": new_tokens, "adapters": adapters_text, "systems": systems}
