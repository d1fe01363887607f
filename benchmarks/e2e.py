"""`loraq bench e2e`: loraq through RabbitMQ as users meet it, against the engine alone and against a
naive PEFT + aio-pika worker (benchmarks/naive_worker.py), every number of one run side by side.

    python -m benchmarks.e2e                                  # or: loraq bench e2e; every scenario
    python -m benchmarks.e2e --json results.json --plot results.png
    python -m benchmarks.e2e --scenarios rotation --rotation-sets 1,100,1000 --rotation-jobs 300
    python -m benchmarks.plot results.json results.png        # the picture again, from the JSON

The default run takes about 12-13 minutes on a 2-core CPU with the embedded SmolLM2-135M: ~1 to
start the workers and write the adapters, ~2 for overhead, ~2 for rotation, ~7-8 for the bursts
(most of it the naive PEFT workers). Progress lines say where it is.

Scenarios (--scenarios, comma-separated; all by default), run in this order:
  overhead   (issue 3) --overhead-jobs jobs of up to --overhead-new-tokens tokens, round-robin over
             the base model and --overhead-adapters adapters, run on an in-process `Engine` built
             from the worker's own flags and through the broker (the worker + `consumer.client`),
             taking turns: all at once (--repeats bursts each), then --overhead-serial-jobs one at a
             time per path, each pair followed by round trips of a bare aio-pika echo in another
             process through a quorum queue (the broker's own cost on this machine). jobs/s, p50/p99,
             what the broker adds per job; the greedy texts of both paths must agree. The wire has
             no `ignore_eos`, so neither path uses it here.
  rotation   (issue 12, point 2) one job at a time, --rotation-new-tokens tokens, cold rank
             --rotation-rank adapters in rotation within each of --rotation-sets (disjoint sets),
             --rotation-jobs jobs per set on loraq and on the naive PEFT worker one job at a time,
             taking turns job by job: p50/p99 latency per set, largest set's p50 / smallest's.
  staggered  (point 1) --jobs jobs on as many distinct rank --rank adapters (--targets) against
             --jobs base-model jobs, published one by one (--gap-ms apart): tokens/s, adapters / base.
  sweep      (the picture's left panel) the --jobs jobs over k distinct adapters, job i on adapter
             i mod k, for each k of --sweep-adapters (0: the base model), on loraq and on the naive
             PEFT worker batching mixed adapters (`adapter_names`): tokens/s per system and k.
  naive      (point 4) the staggered scenario's adapter jobs on loraq and on the naive PEFT worker,
             one job at a time and batching: tokens/s, loraq / PEFT, and how many greedy texts agree.
The staggered, sweep and naive jobs (~--prompt-tokens-token prompts, --new-tokens tokens each, greedy,
ignore_eos_token) are bursts run as benchmarks/user_path.py says: each needed (system, k) once, after
a warm-up round, --repeats rounds taking turns. One loraq worker serves every scenario; the naive
workers (one batching, one serial) start only when a scenario needs them. Each works on a throwaway
topology or queue removed afterwards; their log files are named at start and kept. The printout ends
with the ratios against their targets; --json writes every number, --plot draws them (benchmarks/plot.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import operator
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from benchmarks import plot, user_path
from benchmarks.common import (
    make_prompts,
    model_spec,
    model_tokenizer,
    parse_targets,
    percentile,
    write_random_adapters,
)
from benchmarks.user_path import JOB_TIMEOUT_S, LORAQ, PEFT_BATCH, PEFT_SERIAL, Jobs, Target, say
from consumer.client import DEFAULT_AMQP_URL, Client, GenerationResult
from consumer.logging import configure_logging, redact_url
from consumer.protocol import Topology
from consumer.settings import WorkerSettings
from consumer.worker_process import REPO_ROOT, WorkerProcess, delete_topology, free_port, topology_args
from engine.request import AdapterRef, Completion, GenerationRequest, Outcome, SamplingParams

if TYPE_CHECKING:
    from engine.engine import Engine

SCENARIOS = ("overhead", "rotation", "staggered", "sweep", "naive")
START_TIMEOUT_S = 900.0
TARGET_OVERHEAD_MS = 5.0  # issue 3: the broker path adds < 5 ms p50 ...
TARGET_RATIO = 0.95  # ... and keeps >= 95% of the engine's throughput
TARGET_STAGGERED = 0.95  # issue 12: adapters / base tok/s, published one by one
TARGET_ROTATION = 1.05  # p50 with the largest set / p50 with the smallest
TARGET_NAIVE = 10.0  # loraq / naive PEFT tok/s, the naive worker one job at a time
FLOOR_PER_JOB = 3  # broker-floor round trips after each serial job
FLOOR_IDLE_S = 0.2  # idle before each, as a worker is between serial jobs


@dataclass
class Run:
    """One load shape on one path; per job, in submission order."""

    path: str  # engine | rabbitmq
    load: str  # burst | serial
    walls_s: list[float]  # per burst (or single job) combined into this run
    latencies_ms: list[float]  # submit / publish -> result in hand
    queue_ms: list[float]  # the engine's queue wait (through the worker: + its collection window)
    outside_ms: list[float]  # latency - the engine's total_ms: transport and hand-offs
    generated_tokens: list[int]
    texts: list[str] = field(repr=False)

    @classmethod
    def combine(cls, runs: list[Run], load: str) -> Run:
        """Runs one after another (repeats, or single jobs), as one run."""
        return cls(runs[0].path, load, [w for r in runs for w in r.walls_s],
                   *([x for r in runs for x in getattr(r, name)]
                     for name in ("latencies_ms", "queue_ms", "outside_ms", "generated_tokens",
                                  "texts")))

    @property
    def jobs_per_s(self) -> float:
        return len(self.latencies_ms) / sum(self.walls_s)

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 99)

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "load": self.load, "jobs": len(self.latencies_ms),
                "walls_s": [round(w, 3) for w in self.walls_s],
                "jobs_per_s": round(self.jobs_per_s, 3),
                "p50_ms": round(self.p50_ms, 2), "p99_ms": round(self.p99_ms, 2),
                "mean_ms": round(statistics.fmean(self.latencies_ms), 2),
                "queue_p50_ms": round(percentile(self.queue_ms, 50), 2),
                "outside_engine_p50_ms": round(percentile(self.outside_ms, 50), 2),
                "generated_tokens": sum(self.generated_tokens)}


def worker_flags(args: argparse.Namespace, topology: Topology, adapter_root: Path) -> list[str]:
    """`loraq worker` flags for this run (WorkerProcess adds the metrics ones): room for every
    scenario's jobs and adapters. The in-process engine of the overhead scenario is built from the
    same flags, so both of its paths run one configuration."""
    return ["--amqp-url", args.amqp_url, *topology_args(topology), "--model", args.model,
            "--device", args.device, "--dtype", args.dtype, "--adapter-root", str(adapter_root),
            "--max-batch", str(args.max_batch),
            "--prefetch", str(max(2 * args.jobs, args.overhead_jobs, args.max_batch)),
            "--batch-window-ms", str(args.batch_window_ms), "--max-lora-rank", str(max(args.rank, args.rotation_rank)),
            "--adapter-slots", str(max(args.adapter_slots, args.jobs, args.overhead_adapters)),
            *shlex.split(args.worker_args)]


# ---- (i) the engine directly ---------------------------------------------------------------------

def engine_burst(engine: Engine, jobs: Jobs, new_tokens: int) -> Run:
    """Submit every job at once; each job's latency from its own submit to its on_finish."""
    params = SamplingParams(max_new_tokens=new_tokens)  # what the worker builds from the wire
    lock, done = threading.Lock(), threading.Event()
    ends: dict[int, tuple[float, Outcome]] = {}

    def on_finish(i: int, outcome: Outcome) -> None:
        with lock:
            ends[i] = (time.perf_counter(), outcome)
            if len(ends) == len(jobs):
                done.set()

    starts = []
    t0 = time.perf_counter()
    for i, (prompt, adapter) in enumerate(jobs):
        starts.append(time.perf_counter())
        engine.submit(GenerationRequest(id=uuid.uuid4().hex, prompt=prompt, params=params,
                                        adapter=AdapterRef(adapter) if adapter else None),
                      None, partial(on_finish, i))
    if not done.wait(JOB_TIMEOUT_S):
        raise RuntimeError(f"engine: {len(jobs) - len(ends)} jobs unfinished after {JOB_TIMEOUT_S} s")
    outcomes = [o for _, o in (ends[i] for i in range(len(jobs))) if isinstance(o, Completion)]
    if len(outcomes) < len(jobs):
        failed = [o for _, o in ends.values() if not isinstance(o, Completion)]
        raise RuntimeError(f"engine: {len(failed)} jobs failed, first: {failed[0]}")
    latencies = [(ends[i][0] - starts[i]) * 1000 for i in range(len(jobs))]
    return Run("engine", "burst", [max(end for end, _ in ends.values()) - t0], latencies,
               [o.timings.queue_ms for o in outcomes],
               [lat - o.timings.total_ms for lat, o in zip(latencies, outcomes, strict=True)],
               [o.generated_tokens for o in outcomes], [o.text for o in outcomes])


# ---- (ii) through RabbitMQ -----------------------------------------------------------------------

async def broker_burst(client: Client, jobs: Jobs, new_tokens: int) -> Run:
    """Publish every job at once; each job's latency from its publish to its result."""

    async def one(prompt: str, adapter: str | None) -> tuple[float, float, GenerationResult]:
        start = time.perf_counter()
        result = await client.generate(prompt, adapter_id=adapter, max_new_tokens=new_tokens,
                                       timeout=JOB_TIMEOUT_S)
        return start, time.perf_counter(), result

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(p, a) for p, a in jobs))
    latencies = [(end - start) * 1000 for start, end, _ in out]
    results = [r for _, _, r in out]
    return Run("rabbitmq", "burst", [max(end for _, end, _ in out) - t0], latencies,
               [r.timings.queue_ms for r in results],
               [lat - r.timings.total_ms for lat, r in zip(latencies, results, strict=True)],
               [r.details.generated_tokens for r in results],
               [r.generated_text for r in results])


async def echo_responder(url: str, queue: str) -> None:
    """The other end of `BrokerFloor` (run as its own process): answer each job at once."""
    async with await aio_pika.connect_robust(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        jobs = await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})

        async def answer(message: AbstractIncomingMessage) -> None:
            await channel.default_exchange.publish(
                aio_pika.Message(message.body, correlation_id=message.correlation_id),
                routing_key=message.reply_to or "", mandatory=True)
            await message.ack()

        await jobs.consume(answer)
        await asyncio.Future()  # until killed


class BrokerFloor:
    """Round trips of a tiny job through a throwaway quorum queue to a bare aio-pika echo in
    another process and back through a reply queue, confirms on both legs: what any worker pays
    on this broker, protocol and machine (the quorum queue commits each job before delivering it;
    idle processes take time to wake). Taken between the serial jobs, under the same conditions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.queue = f"loraq-bench-floor-{uuid.uuid4().hex[:8]}"
        self.round_trips_ms: list[float] = []
        self._waiting: dict[str, asyncio.Future[float]] = {}

    async def __aenter__(self) -> BrokerFloor:
        self._responder = await asyncio.create_subprocess_exec(  # cwd: where `benchmarks` imports
            sys.executable, "-m", "benchmarks.e2e", "--echo-queue", self.queue, "--amqp-url", self.url,
            cwd=REPO_ROOT)
        self._connection = await aio_pika.connect_robust(self.url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._replies = await self._channel.declare_queue(exclusive=True)
        await self._replies.consume(self._on_reply, no_ack=True)
        while True:  # until the responder's queue exists and takes jobs (a new quorum queue can nack at first)
            try:
                probe = await self._connection.channel()
                await probe.declare_queue(self.queue, passive=True)
                await probe.close()
                await self._round_trip()
                return self
            except (aio_pika.exceptions.ChannelClosed, aio_pika.exceptions.DeliveryError):
                await asyncio.sleep(0.2)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiting = self._waiting.pop(message.correlation_id or "", None)
        if waiting is not None:
            waiting.set_result(time.perf_counter())

    async def _round_trip(self) -> float:
        cid = uuid.uuid4().hex
        self._waiting[cid] = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        try:
            await self._channel.default_exchange.publish(
                aio_pika.Message(b"{}", correlation_id=cid, reply_to=self._replies.name,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=self.queue)
            return (await asyncio.wait_for(self._waiting[cid], JOB_TIMEOUT_S) - start) * 1000
        finally:
            self._waiting.pop(cid, None)

    async def round_trip(self) -> None:
        self.round_trips_ms.append(await self._round_trip())

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._channel.queue_delete(self.queue)
            await self._connection.close()
        finally:
            self._responder.kill()
            await self._responder.wait()


async def measure_overhead(engine: Engine, url: str, topology: Topology, warmup: Jobs, burst: Jobs,
                           serial: Jobs, new_tokens: int,
                           repeats: int) -> tuple[dict[tuple[str, str], Run], list[float]]:
    """Both paths, interleaved so that drifting background load hits both alike: bursts
    alternate which path goes first, serial jobs alternate path job by job, each pair followed by
    a few `BrokerFloor` round trips. The runs by (path, load), and the floor's round trips."""

    def on_engine(jobs: Jobs, tokens: int) -> Any:
        return asyncio.to_thread(engine_burst, engine, jobs, tokens)

    async with Client(url, topology=topology, timeout=JOB_TIMEOUT_S) as client:
        await on_engine(warmup, 2)
        await broker_burst(client, warmup, 2)
        bursts: dict[str, list[Run]] = {"engine": [], "rabbitmq": []}
        for rep in range(repeats):
            for path in (("engine", "rabbitmq") if rep % 2 == 0 else ("rabbitmq", "engine")):
                run = await (on_engine(burst, new_tokens) if path == "engine"
                             else broker_burst(client, burst, new_tokens))
                bursts[path].append(run)
                say(f"overhead: burst {rep + 1}/{repeats} {path}: {run.jobs_per_s:.2f} jobs/s")
        serials: dict[str, list[Run]] = {"engine": [], "rabbitmq": []}
        async with BrokerFloor(url) as floor:
            for i, job in enumerate(serial):
                serials["engine"].append(await on_engine([job], new_tokens))
                serials["rabbitmq"].append(await broker_burst(client, [job], new_tokens))
                for _ in range(FLOOR_PER_JOB):
                    await asyncio.sleep(FLOOR_IDLE_S)
                    await floor.round_trip()
                if (i + 1) % 4 == 0 or i + 1 == len(serial):
                    say(f"overhead: one at a time, {i + 1}/{len(serial)} jobs on each path")
    return {**{(path, "burst"): Run.combine(runs, "burst") for path, runs in bursts.items()},
            **{(path, "serial"): Run.combine(runs, "serial") for path, runs in serials.items()}}, \
        floor.round_trips_ms


def run_overhead(args: argparse.Namespace, flags: list[str], topology: Topology, prompts: Sequence[str],
                 adapters: Sequence[str]) -> tuple[dict[tuple[str, str], Run], list[float], str]:
    """The overhead scenario: an in-process engine built from the worker's `flags` against the
    worker. Its runs, the broker floor's round trips and the engine's device."""
    from engine.engine import Engine  # not at the top: the echo responder runs without torch

    configure_logging("warning")  # the in-process engine's per-request events would drown the progress
    say("overhead: loading the in-process engine ...")
    engine = Engine(WorkerSettings.from_args(flags, env={}).engine_config())
    try:
        mix = [None, *adapters[:args.overhead_adapters]]
        burst = [(prompts[i], mix[i % len(mix)]) for i in range(args.overhead_jobs)]
        serial = [burst[i % len(burst)] for i in range(args.overhead_serial_jobs)]
        warmup = [(prompts[0], name) for name in mix]  # every adapter's load, off the clock
        say("overhead: measuring both paths, interleaved ...")
        runs, floor = asyncio.run(measure_overhead(engine, args.amqp_url, topology, warmup, burst, serial,
                                                   args.overhead_new_tokens, args.repeats))
        return runs, floor, str(engine.model.device)
    finally:
        engine.shutdown()


def overhead_p50(run: Run) -> float:
    """p50 of what a job spent outside the engine's compute: queue wait + transport."""
    return percentile([q + o for q, o in zip(run.queue_ms, run.outside_ms, strict=True)], 50)


def report_overhead(args: argparse.Namespace, device: str, runs: dict[tuple[str, str], Run],
                    floor: list[float]) -> tuple[list[str], dict[str, Any]]:
    """The overhead scenario's table and numbers (its targets are in the ratio table)."""
    import torch

    burst_e, burst_r = runs["engine", "burst"], runs["rabbitmq", "burst"]
    serial_e, serial_r = runs["engine", "serial"], runs["rabbitmq", "serial"]
    same_burst = sum(a == b for a, b in zip(burst_e.texts, burst_r.texts, strict=True))
    same_serial = sum(a == b for a, b in zip(serial_e.texts, serial_r.texts, strict=True))
    s: dict[str, Any] = {
        "burst_throughput_ratio": burst_r.jobs_per_s / burst_e.jobs_per_s,
        "burst_p50_latency_diff_ms": burst_r.p50_ms - burst_e.p50_ms,
        "burst_p99_latency_diff_ms": burst_r.p99_ms - burst_e.p99_ms,
        "serial_p50_latency_diff_ms": serial_r.p50_ms - serial_e.p50_ms,
        "serial_p50_overhead_ms": overhead_p50(serial_r) - overhead_p50(serial_e),
        "burst_p50_outside_ms": percentile(burst_r.outside_ms, 50),
        "serial_p50_transport_ms": percentile(serial_r.outside_ms, 50),
        "serial_p50_queue_added_ms": percentile(serial_r.queue_ms, 50)
        - percentile(serial_e.queue_ms, 50),
        "broker_floor_p50_ms": percentile(floor, 50),
        "identical_texts_burst": f"{same_burst}/{len(burst_e.texts)}",
        "identical_texts_serial": f"{same_serial}/{len(serial_e.texts)}",
    }
    over: float = s["serial_p50_overhead_ms"]
    lines = [
        f"overhead (issue 3): {args.overhead_jobs} jobs over base + {args.overhead_adapters} rank-{args.rank} "
        f"adapters, <= {args.overhead_new_tokens} new tokens, on the engine in-process and through the broker",
        f"  on {device}, max batch {args.max_batch}, worker batch window {args.batch_window_ms:g} ms, "
        f"torch threads {torch.get_num_threads()}",
        f"  {'load':7s} {'path':9s} {'jobs':>4s} {'jobs/s':>7s} {'p50 ms':>9s} {'p99 ms':>9s} "
        f"{'queue p50':>9s} {'outside p50':>11s} {'tokens':>6s}",
        *(f"  {r.load:7s} {r.path:9s} {len(r.latencies_ms):4d} {r.jobs_per_s:7.2f} {r.p50_ms:9.1f} "
          f"{r.p99_ms:9.1f} {percentile(r.queue_ms, 50):9.1f} {percentile(r.outside_ms, 50):11.1f} "
          f"{sum(r.generated_tokens):6d}" for r in (burst_e, burst_r, serial_e, serial_r)),
        "  queue: the engine's queue wait (through the worker: + its batch window); outside: latency "
        "minus the engine's total (broker transport, hand-offs)",
        f"  seconds per burst: engine {', '.join(f'{w:.1f}' for w in burst_e.walls_s)}, rabbitmq "
        f"{', '.join(f'{w:.1f}' for w in burst_r.walls_s)}",
        f"  broker overhead per job, p50 of queue + outside, one at a time: {over:+.1f} ms "
        f"(transport {s['serial_p50_transport_ms']:.1f} ms, queue {s['serial_p50_queue_added_ms']:+.1f} ms); "
        f"the broker's own round trip, p50 of {len(floor)} (a bare aio-pika echo in another process, quorum "
        f"queue, confirms): {s['broker_floor_p50_ms']:.1f} ms; loraq's own share: "
        f"{over - s['broker_floor_p50_ms']:+.1f} ms",
        f"  time outside the engine in the burst, p50: {percentile(burst_r.outside_ms, 50):.1f} ms "
        f"(replies published while the batch runs)",
        f"  p50 latency difference (includes compute noise): one at a time "
        f"{s['serial_p50_latency_diff_ms']:+.1f} ms, burst {s['burst_p50_latency_diff_ms']:+.1f} ms"
        f" (p99 {s['burst_p99_latency_diff_ms']:+.1f} ms)",
        f"  identical texts engine vs rabbitmq: burst {same_burst}/{len(burst_e.texts)}, serial "
        f"{same_serial}/{len(serial_e.texts)}",
    ]
    return lines, {"device": device, "runs": [r.summary() for r in runs.values()],
                   "summary": {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}}


# ---- the ratios ----------------------------------------------------------------------------------

COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


@dataclass(frozen=True)
class Ratio:
    """A row of the ratio table: a value measured in this run, what it came from, and its target
    (`op` `bound`; none when `op` is empty: `bound` is then unused)."""

    name: str
    value: float
    detail: str
    op: str = ""
    bound: float = 0.0
    fmt: str = ".3f"

    @property
    def met(self) -> bool | None:
        return COMPARE[self.op](self.value, self.bound) if self.op else None

    def line(self) -> str:
        target = f"{self.op} {self.bound:g}: {'met' if self.met else 'missed'}" if self.op else ""
        return f"  {self.name:54s} {format(self.value, self.fmt):>8s}  {target:16s}  {self.detail}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "target": f"{self.op} {self.bound:g}" if self.op else None,
                "met": self.met, "detail": self.detail}


def ratios(numbers: dict[str, Any]) -> list[Ratio]:
    """The ratio table's rows, from a run's numbers (whichever scenarios it ran)."""
    jobs = numbers["workload"]["jobs"]
    rows = []
    if "overhead" in numbers:
        s = numbers["overhead"]["summary"]
        rows += [Ratio("through the broker / engine alone, jobs/s in bursts", s["burst_throughput_ratio"],
                       f"texts identical: {s['identical_texts_burst']}", ">=", TARGET_RATIO),
                 Ratio("broker overhead per job one at a time, p50 ms", s["serial_p50_overhead_ms"],
                       f"the broker's own round trip: {s['broker_floor_p50_ms']:.1f} ms", "<", TARGET_OVERHEAD_MS,
                       "+.1f")]
    if "rotation" in numbers:
        for name, system in numbers["rotation"]["systems"].items():
            if "p50_ratio" in system:
                p50 = {int(n): row["p50_ms"] for n, row in system["sets"].items()}
                rows.append(Ratio(f"rotation: p50 over {max(p50)} / over {min(p50)} adapters, {name}",
                                  system["p50_ratio"], f"{p50[max(p50)]:.0f} / {p50[min(p50)]:.0f} ms",
                                  "<=" if name == LORAQ else "", TARGET_ROTATION))
    if "staggered" in numbers:
        s = numbers["staggered"]
        rows.append(Ratio(f"staggered: {jobs} distinct adapters / base model, tok/s", s["ratio"],
                          f"{s['adapters_tok_s']:.1f} / {s['base_tok_s']:.1f} tok/s, rounds "
                          f"{', '.join(f'{r:.3f}' for r in s['ratio_per_round'])}", ">=", TARGET_STAGGERED))
    if "naive" in numbers:
        s = numbers["naive"]
        for name, how, op in ((PEFT_SERIAL, "one job at a time", ">="), (PEFT_BATCH, "adapter_names batches", "")):
            rows.append(Ratio(f"loraq / naive PEFT worker {how}, tok/s", s[name]["ratio"],
                              f"{s['loraq_tok_s']:.1f} / {s[name]['tok_s']:.1f} tok/s on {jobs} adapters, texts "
                              f"identical: {s[name]['identical_texts']}", op, TARGET_NAIVE, ".2f"))
    return rows


# ---- the run -------------------------------------------------------------------------------------

def every(seconds: float, name: str) -> Callable[[float, str], None]:
    """A `wait_healthy` progress callback that says where `name` is at most every `seconds`."""
    last = [-seconds]

    def tick(elapsed: float, status: str) -> None:
        if elapsed - last[0] >= seconds:
            last[0] = elapsed
            say(f"waiting for {name} ({elapsed:.0f} s): {status}")

    return tick


def write_adapters(root: Path, names: list[str], spec: Any, rank: int, targets: tuple[str, ...], what: str) -> None:
    """`write_random_adapters` in chunks, with a progress line per chunk."""
    chunk = 100
    for i in range(0, len(names), chunk):
        write_random_adapters(root, names[i:i + chunk], spec, rank, targets)
        say(f"{what}: wrote {min(i + chunk, len(names))}/{len(names)}")


async def measure_user_path(args: argparse.Namespace, scenarios: list[str], targets: dict[str, Target],
                            prompts: list[str], adapters: list[str], sets: dict[int, list[str]]) -> dict[str, Any]:
    """The rotation, then the bursts the other scenarios need, from one publisher."""
    results: dict[str, Any] = {}
    async with user_path.Publisher(args.amqp_url) as publisher:
        if "rotation" in scenarios:  # first: the naive worker has no adapters loaded yet, as loraq's tiers
            results["rotation"] = await user_path.run_rotation(
                publisher, [targets[LORAQ], targets[PEFT_SERIAL]], sets, prompts, args.rotation_jobs,
                args.rotation_new_tokens)
        cells = user_path.cells(scenarios, targets, args.jobs, args.sweep_adapters)
        if cells:
            results["bursts"] = await user_path.run_bursts(publisher, cells, prompts, adapters, args.jobs,
                                                           args.new_tokens, args.gap_ms, args.repeats)
    return results


def report(args: argparse.Namespace, scenarios: list[str], model: str,
           results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The printout (each scenario's table, then the ratios against their targets) and the JSON numbers."""
    date = time.strftime("%Y-%m-%d %H:%M")
    numbers: dict[str, Any] = {"model": model, "cores": os.cpu_count(), "date": date,
                               "workload": {k: v for k, v in vars(args).items()
                                            if k not in ("json_out", "plot", "echo_queue")}}
    sections = [[f"loraq bench e2e: {model}, {os.cpu_count()} CPU cores, {date}, through RabbitMQ at "
                 f"{redact_url(args.amqp_url)}, ~{args.prompt_tokens}-token prompts, greedy"]]
    adapters_text = f"rank-{args.rank} adapters on {args.targets}"
    if "overhead" in results:
        runs, floor, device = results["overhead"]
        lines, numbers["overhead"] = report_overhead(args, device, runs, floor)
        sections.append(lines)
    bursts = results.get("bursts", {})
    if "staggered" in scenarios:
        numbers["staggered"] = user_path.staggered_numbers(bursts, args.jobs)
    if "sweep" in scenarios:
        lines, numbers["sweep"] = user_path.report_sweep(bursts, args.sweep_adapters, args.jobs, args.new_tokens,
                                                         adapters_text)
        sections.append(lines)
    if "rotation" in scenarios:
        lines, numbers["rotation"] = user_path.report_rotation(
            results["rotation"], args.rotation_new_tokens, f"rank-{args.rotation_rank} adapters on {args.targets}")
        sections.append(lines)
    if "naive" in scenarios:
        numbers["naive"] = user_path.naive_numbers(bursts, args.jobs)
    rows = ratios(numbers)
    numbers["ratios"] = [r.to_json() for r in rows]
    sections.append(["ratios measured side by side in this run", *(r.line() for r in rows)])
    return "\n\n".join("\n".join(lines) for lines in sections), numbers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="loraq bench e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"some of {','.join(SCENARIOS)}")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt-tokens", type=int, default=70)
    ap.add_argument("--rank", type=int, default=16, help="rank of the adapters of every scenario but rotation")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds per cell / bursts per path, taking turns")
    ap.add_argument("--jobs", type=int, default=32, help="staggered, sweep, naive: jobs per burst")
    ap.add_argument("--new-tokens", type=int, default=32, help="staggered, sweep, naive: tokens per job")
    ap.add_argument("--gap-ms", type=float, default=0.0, help="pause between publishes (beyond each confirm)")
    ap.add_argument("--sweep-adapters", default="0,1,2,4,8,16,32",
                    help="sweep: distinct adapters per burst, each <= --jobs (0: the base model)")
    ap.add_argument("--rotation-sets", default="1,10,100,1000")
    ap.add_argument("--rotation-jobs", type=int, default=20, help="jobs per set and system, one at a time")
    ap.add_argument("--rotation-rank", type=int, default=8)
    ap.add_argument("--rotation-new-tokens", type=int, default=10)
    ap.add_argument("--overhead-jobs", type=int, default=64, help="overhead: jobs per burst")
    ap.add_argument("--overhead-serial-jobs", type=int, default=16, help="overhead: jobs one at a time per path")
    ap.add_argument("--overhead-new-tokens", type=int, default=16)
    ap.add_argument("--overhead-adapters", type=int, default=8, help="overhead: distinct adapters (+ base)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--adapter-slots", type=int, default=32, help="device slots (at least the adapters of a burst)")
    ap.add_argument("--worker-args", default="", help="more `loraq worker` flags, one string")
    ap.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    ap.add_argument("--json", dest="json_out", metavar="FILE",
                    help="also write every number as JSON to FILE")
    ap.add_argument("--plot", metavar="FILE.png", help="draw the sweep and rotation (pip install 'loraq[plot]')")
    ap.add_argument("--echo-queue", help=argparse.SUPPRESS)  # internal: the BrokerFloor responder
    args = ap.parse_args(argv)
    args.scenarios = [s for s in SCENARIOS if s in args.scenarios.split(",")]
    args.sweep_adapters = sorted({int(k) for k in args.sweep_adapters.split(",")})
    args.rotation_sets = sorted({int(n) for n in args.rotation_sets.split(",")})
    if not args.scenarios:
        ap.error(f"--scenarios: some of {', '.join(SCENARIOS)}")
    if not all(0 <= k <= args.jobs for k in args.sweep_adapters):
        ap.error("--sweep-adapters: each between 0 and --jobs")
    if min(args.rotation_sets) < 1:
        ap.error("--rotation-sets: each at least 1")
    if args.plot and not {"sweep", "rotation"} <= set(args.scenarios):
        ap.error("--plot draws the sweep and rotation scenarios: include both")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_queue:
        asyncio.run(echo_responder(args.amqp_url, args.echo_queue))
        return 0
    scenarios: list[str] = args.scenarios
    if args.plot:
        plot.require_matplotlib()  # now, not after the run

    say(f"reading the config and tokenizer of {args.model} ...")
    spec, tokenizer = model_spec(args.model), model_tokenizer(args.model)
    count = max(args.jobs, args.overhead_jobs, args.rotation_jobs)
    prompts = [tokenizer.decode(ids) for ids in make_prompts(tokenizer, count, args.prompt_tokens)]
    root = Path(tempfile.mkdtemp(prefix="loraq-bench-e2e-"))
    logs = Path(tempfile.mkdtemp(prefix="loraq-bench-e2e-logs-"))
    adapters = [f"distinct/a{i:03d}" for i in range(max(args.jobs, args.overhead_adapters))]
    sets = ({n: [f"rotation/s{n}/a{i:04d}" for i in range(n)] for n in args.rotation_sets}
            if "rotation" in scenarios else {})
    topology = Topology.prefixed(f"loraq-bench-e2e-{uuid.uuid4().hex[:8]}")
    flags = worker_flags(args, topology, root)
    targets = {LORAQ: Target(LORAQ, topology.exchange, topology.routing_key)}
    workers = {LORAQ: WorkerProcess(flags, logs / "loraq-worker.log", free_port())}
    for name, mode, needed_by in ((PEFT_BATCH, ["--batch"], {"sweep", "naive"}),
                                  (PEFT_SERIAL, [], {"rotation", "naive"})):
        if needed_by & set(scenarios):
            targets[name] = Target(name, "", f"loraq-bench-{name}-{uuid.uuid4().hex[:8]}")
            workers[name] = WorkerProcess(
                ["--queue", targets[name].routing_key, "--adapter-root", str(root), "--model", args.model,
                 "--amqp-url", args.amqp_url, "--max-batch", str(args.max_batch), *mode],
                logs / f"{name}-worker.log", free_port(), command=(sys.executable, "-m", "benchmarks.naive_worker"))
    ok = False
    try:
        for w in workers.values():  # they load their models while the adapters are written
            w.start()
        say(f"workers {', '.join(workers)} started, logs in {logs}; loraq worker flags: {shlex.join(flags)}")
        write_adapters(root, adapters, spec, args.rank, parse_targets(args.targets),
                       f"{len(adapters)} rank-{args.rank} adapters")
        for n, names in sets.items():
            write_adapters(root, names, spec, args.rotation_rank, parse_targets(args.targets),
                           f"rotation set of {n} rank-{args.rotation_rank} adapters")
        for name, w in workers.items():
            asyncio.run(w.wait_healthy(START_TIMEOUT_S, every(10.0, f"the {name} worker")))
        say(f"workers ready; measuring {', '.join(scenarios)} ...")
        results: dict[str, Any] = {}
        if "overhead" in scenarios:
            results["overhead"] = run_overhead(args, flags, topology, prompts, adapters)
        results |= asyncio.run(measure_user_path(args, scenarios, targets, prompts, adapters, sets))
        ok = True
    finally:
        codes = {name: w.stop() for name, w in workers.items()}
        asyncio.run(delete_topology(args.amqp_url, topology))
        asyncio.run(delete_queues(args.amqp_url, [t.routing_key for name, t in targets.items() if name != LORAQ]))
        shutil.rmtree(root, ignore_errors=True)
        for name, code in codes.items():
            if not ok or code not in (0, -signal.SIGTERM):
                w = workers[name]
                print(f"the {name} worker exited with code {code}; its log ({w.log_path}) ends:\n{w.log_tail()}",
                      file=sys.stderr)

    text, numbers = report(args, scenarios, spec.base_model_name, results)
    print(f"\n{text}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(numbers, indent=2) + "\n")
    if args.plot:
        plot.draw(numbers, Path(args.plot))
        say(f"wrote {args.plot}")
    return 0


async def delete_queues(url: str, queues: list[str]) -> None:
    """Remove the naive workers' queues."""
    connection = await aio_pika.connect(url)
    async with connection:
        for queue in queues:
            channel = await connection.channel()
            await channel.queue_delete(queue)


if __name__ == "__main__":
    raise SystemExit(main())
