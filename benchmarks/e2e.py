"""End-to-end benchmark (issue 3): one workload run on the engine directly and through RabbitMQ.

    python -m benchmarks.e2e            # or: loraq bench e2e

    engine    an in-process `Engine`; requests submitted from this thread
    rabbitmq  a worker subprocess (same settings, its own engine) fed by `consumer.client.Client`

Each path runs two load shapes:
    burst   every job submitted / published at once: throughput and latency under load
    serial  one job at a time: what the broker path adds to a single job, nothing else running

Workload: --jobs text prompts of about --prompt-tokens tokens, round-robin over the base model and
--adapters random PEFT adapters (written to a temp adapter root), greedy, --new-tokens each. The
wire has no `ignore_eos`, so neither path uses it: both decode the same greedy tokens and the
printout checks that their texts agree. Adapter loads are warmed up off the clock on both paths,
and the paths take turns (--repeats bursts each, serial jobs alternating) so that background load
on the machine hits both alike. Latency is per job, from submit / publish to the result in hand;
the broker's own cost is also shown apart from compute (queue wait + time outside the engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.common import make_prompts, parse_targets, percentile, write_random_adapters
from consumer.client import DEFAULT_AMQP_URL, Client, GenerationResult
from consumer.logging import configure_logging
from consumer.protocol import Topology
from consumer.settings import WorkerSettings
from consumer.worker_process import REPO_ROOT, WorkerProcess, delete_topology, free_port, topology_args
from engine.request import AdapterRef, Completion, GenerationRequest, Outcome, SamplingParams

if TYPE_CHECKING:
    from engine.engine import Engine

START_TIMEOUT_S = 600.0
JOB_TIMEOUT_S = 600.0
TARGET_OVERHEAD_MS = 5.0  # issue 3: the broker path adds < 5 ms p50 ...
TARGET_RATIO = 0.95  # ... and keeps >= 95% of the engine's throughput
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
    """`loraq worker` flags for this run (WorkerProcess adds the metrics ones). The in-process
    engine is built from the same flags, so both paths run one configuration."""
    return ["--amqp-url", args.amqp_url, *topology_args(topology), "--model", args.model,
            "--device", args.device, "--dtype", args.dtype, "--adapter-root", str(adapter_root),
            "--max-batch", str(args.max_batch), "--prefetch", str(max(args.jobs, args.max_batch)),
            "--batch-window-ms", str(args.batch_window_ms), "--max-lora-rank", str(max(args.rank, 1)),
            "--adapter-slots", str(max(args.adapters, args.adapter_slots))]


# ---- (i) the engine directly ---------------------------------------------------------------------

def engine_burst(engine: Engine, jobs: list[tuple[str, str | None]], new_tokens: int) -> Run:
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

async def broker_burst(client: Client, jobs: list[tuple[str, str | None]], new_tokens: int) -> Run:
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


Jobs = list[tuple[str, str | None]]  # (prompt, adapter id or None) per job


async def measure(engine: Engine, url: str, topology: Topology, warmup: Jobs, burst: Jobs, serial: Jobs,
                  new_tokens: int, repeats: int) -> tuple[dict[tuple[str, str], Run], list[float]]:
    """Both paths, interleaved so that drifting background load hits both alike: bursts
    alternate which path goes first, serial jobs alternate path job by job, each pair followed by
    a few `BrokerFloor` round trips."""

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
        serials: dict[str, list[Run]] = {"engine": [], "rabbitmq": []}
        async with BrokerFloor(url) as floor:
            for job in serial:
                serials["engine"].append(await on_engine([job], new_tokens))
                serials["rabbitmq"].append(await broker_burst(client, [job], new_tokens))
                for _ in range(FLOOR_PER_JOB):
                    await asyncio.sleep(FLOOR_IDLE_S)
                    await floor.round_trip()
    return {**{(path, "burst"): Run.combine(runs, "burst") for path, runs in bursts.items()},
            **{(path, "serial"): Run.combine(runs, "serial") for path, runs in serials.items()}}, \
        floor.round_trips_ms


# ---- the run -------------------------------------------------------------------------------------

def overhead_p50(run: Run) -> float:
    """p50 of what a job spent outside the engine's compute: queue wait + transport."""
    return percentile([q + o for q, o in zip(run.queue_ms, run.outside_ms, strict=True)], 50)


def report(args: argparse.Namespace, device: str, runs: dict[tuple[str, str], Run],
           floor: list[float]) -> tuple[str, dict[str, Any]]:
    """The printed table and the JSON numbers."""
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
    ratio: float = s["burst_throughput_ratio"]
    over: float = s["serial_p50_overhead_ms"]
    lines = [
        f"e2e benchmark: {args.jobs} jobs over base + {args.adapters} random rank-{args.rank} "
        f"adapters ({args.targets}), ~{args.prompt_tokens} prompt tokens, <= {args.new_tokens} new "
        f"tokens, greedy",
        f"model {args.model} on {device}, max batch {args.max_batch}, worker batch window "
        f"{args.batch_window_ms:g} ms, torch threads {torch.get_num_threads()}",
        "",
        f"{'load':7s} {'path':9s} {'jobs':>4s} {'jobs/s':>7s} {'p50 ms':>9s} {'p99 ms':>9s} "
        f"{'queue p50':>9s} {'outside p50':>11s} {'tokens':>6s}",
        *(f"{r.load:7s} {r.path:9s} {len(r.latencies_ms):4d} {r.jobs_per_s:7.2f} {r.p50_ms:9.1f} "
          f"{r.p99_ms:9.1f} {percentile(r.queue_ms, 50):9.1f} {percentile(r.outside_ms, 50):11.1f} "
          f"{sum(r.generated_tokens):6d}" for r in (burst_e, burst_r, serial_e, serial_r)),
        "queue: the engine's queue wait (through the worker: + its batch window); outside: latency "
        "minus the engine's total (broker transport, hand-offs)",
        "",
        f"throughput rabbitmq / engine (burst): {ratio:.3f}   "
        f"[target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'missed'}]; seconds per "
        f"burst: engine {', '.join(f'{w:.1f}' for w in burst_e.walls_s)}, rabbitmq "
        f"{', '.join(f'{w:.1f}' for w in burst_r.walls_s)}",
        f"broker overhead per job, p50 of queue + outside, one at a time: {over:+.1f} ms "
        f"(transport {s['serial_p50_transport_ms']:.1f} ms, queue "
        f"{s['serial_p50_queue_added_ms']:+.1f} ms)   "
        f"[target < {TARGET_OVERHEAD_MS:g} ms: {'met' if over < TARGET_OVERHEAD_MS else 'missed'}]",
        f"  the broker's own round trip, p50 of {len(floor)} (a bare aio-pika echo in another "
        f"process, quorum queue, confirms): {s['broker_floor_p50_ms']:.1f} ms; loraq's own share: "
        f"{over - s['broker_floor_p50_ms']:+.1f} ms",
        f"time outside the engine in the burst, p50: {percentile(burst_r.outside_ms, 50):.1f} ms "
        f"(replies published while the batch runs)",
        f"p50 latency difference (includes compute noise): one at a time "
        f"{s['serial_p50_latency_diff_ms']:+.1f} ms, burst {s['burst_p50_latency_diff_ms']:+.1f} ms"
        f" (p99 {s['burst_p99_latency_diff_ms']:+.1f} ms)",
        f"identical texts engine vs rabbitmq: burst {same_burst}/{len(burst_e.texts)}, serial "
        f"{same_serial}/{len(serial_e.texts)}",
    ]
    numbers = {"workload": {k: v for k, v in vars(args).items() if k != "json_out"},
               "device": device, "runs": [r.summary() for r in runs.values()],
               "summary": {k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()}}
    return "\n".join(lines), numbers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loraq bench e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--jobs", type=int, default=64, help="jobs in the burst")
    ap.add_argument("--repeats", type=int, default=2, help="bursts per path (interleaved)")
    ap.add_argument("--serial-jobs", type=int, default=16, help="jobs run one at a time per path")
    ap.add_argument("--prompt-tokens", type=int, default=70)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8, help="distinct random adapters (+ base)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--adapter-slots", type=int, default=32, help="device slots (at least --adapters)")
    ap.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    ap.add_argument("--json", dest="json_out", metavar="FILE",
                    help="also write the numbers as JSON to FILE ('-': stdout)")
    ap.add_argument("--echo-queue", help=argparse.SUPPRESS)  # internal: the BrokerFloor responder
    args = ap.parse_args(argv)
    if args.echo_queue:
        asyncio.run(echo_responder(args.amqp_url, args.echo_queue))
        return 0
    targets = parse_targets(args.targets)

    from engine.engine import Engine  # not at the top: the echo responder above runs without torch

    configure_logging("warning")  # the in-process engine's per-request events would drown the table
    root = Path(tempfile.mkdtemp(prefix="loraq-bench-e2e-"))
    log_path = Path(tempfile.mkstemp(prefix="loraq-bench-e2e-worker-", suffix=".log")[1])
    topology = Topology.prefixed(f"loraq-bench-{uuid.uuid4().hex[:8]}")
    flags = worker_flags(args, topology, root / "adapters")
    settings = WorkerSettings.from_args(flags, env={})
    (root / "adapters").mkdir()
    worker = WorkerProcess(flags, log_path, free_port())
    engine = None
    ok = False
    try:
        # The worker loads its model while this process loads its own.
        print(f"starting the worker (log {worker.log_path}) and loading the in-process engine ...",
              file=sys.stderr, flush=True)
        worker.start()
        engine = Engine(settings.engine_config())
        spec = engine.spec
        names = [f"bench/a{i:02d}" for i in range(args.adapters)]
        write_random_adapters(root / "adapters", names, spec, args.rank, targets)
        tok = engine.tokenizer
        texts = [tok.decode(ids) for ids in make_prompts(tok, args.jobs, args.prompt_tokens)]
        mix = [None, *names]
        burst = [(texts[i], mix[i % len(mix)]) for i in range(args.jobs)]
        serial = [burst[i % len(burst)] for i in range(args.serial_jobs)]
        warmup = [(texts[0], name) for name in mix]  # every adapter's load, off the clock

        ready_s = asyncio.run(worker.wait_healthy(START_TIMEOUT_S))
        print(f"worker healthy after {ready_s:.1f} s", file=sys.stderr, flush=True)
        print("measuring both paths, interleaved ...", file=sys.stderr, flush=True)
        runs, floor = asyncio.run(measure(engine, args.amqp_url, topology, warmup, burst, serial,
                                          args.new_tokens, args.repeats))
        device = str(engine.model.device)
        ok = True
    finally:
        if engine is not None:
            engine.shutdown()
        code = worker.stop()
        asyncio.run(delete_topology(args.amqp_url, topology))
        shutil.rmtree(root, ignore_errors=True)
        if not ok or code not in (0, -signal.SIGTERM):
            print(f"worker exited with code {code}; its log ({worker.log_path}) ends:\n"
                  f"{worker.log_tail()}", file=sys.stderr)

    table, numbers = report(args, device, runs, floor)
    # with --json -: stdout is the JSON alone, the table goes to stderr
    print(f"\n{table}", file=sys.stderr if args.json_out == "-" else sys.stdout)
    if args.json_out == "-":
        print(json.dumps(numbers, indent=2))
    elif args.json_out:
        Path(args.json_out).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
