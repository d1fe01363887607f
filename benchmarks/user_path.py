"""User-path benchmark (issue 12): loraq as a backend app sees it, through the broker, with jobs
published one after another as a client publishes them, each awaiting its publisher confirm.

    python -m benchmarks.user_path                               # every scenario at the issue's sizes
    python -m benchmarks.user_path --scenarios rotation --rotation-sets 1,100,1000 --rotation-jobs 300

Scenarios (--scenarios, comma-separated; all by default):
  staggered  (point 1) --jobs jobs on as many distinct random rank---rank adapters (--targets) against
             --jobs base-model jobs: ~--prompt-tokens-token prompts, --new-tokens tokens each (greedy,
             ignore_eos_token), published one by one (--gap-ms apart). Tokens/s from the first publish
             to the last result, and adapters / base. The adapters are loaded once before timing (a
             round of 2-token jobs); the two kinds take turns, --repeats rounds each.
  rotation   (point 2) one job at a time (publish, await the result, next; --rotation-new-tokens
             tokens), adapters in rotation within each set of --rotation-sets (disjoint sets of cold
             random rank---rotation-rank adapters, just written, so their files are in the page
             cache). p50/p99 latency per set, the largest set's p50 over the smallest's, and the
             worker's own queue_ms and adapter_load_ms medians. Sets run one after another:
             interleaved, one set's adapters would evict another's from the host tier.
  naive      (point 4) the staggered scenario's adapter jobs on loraq and on benchmarks/naive_worker.py
             (PEFT + aio-pika; --naive-mode batch: mixed-adapter batches, serial: one job at a time),
             taking turns after a warm-up round on each; tokens/s, loraq / naive, and how many
             greedy texts agree.
Workers run as subprocesses (one loraq worker for every scenario, plus the naive one), each on a
throwaway topology or queue removed afterwards; their log files are named at start and kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.common import (
    make_prompts,
    model_spec,
    model_tokenizer,
    parse_targets,
    percentile,
    progress,
    write_random_adapters,
)
from consumer.protocol import Topology
from consumer.worker_process import WorkerProcess, delete_topology, free_port, topology_args

say = partial(progress, "user-path")
SCENARIOS = ("staggered", "rotation", "naive")
START_TIMEOUT_S = 900.0
JOB_TIMEOUT_S = 900.0
STRIDE = 37  # rotation order: consecutive jobs never share an adapter (coprime with the set sizes used)
TARGET_STAGGERED = 0.95  # issue 12: adapters / base tok/s, published one by one
TARGET_ROTATION = 1.05  # p50 with the largest set / p50 with one adapter
TARGET_NAIVE = 10.0  # loraq / naive PEFT tok/s


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


@dataclass
class Burst:
    """Jobs published one after another, results awaited together."""

    target: str
    kind: str  # base | adapters
    wall_s: float  # first publish -> last result
    replies: list[Reply] = field(repr=False)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.replies)

    @property
    def texts(self) -> list[str]:
        return [r.body["generated_text"] for r in self.replies]


async def burst(publisher: Publisher, target: Target, kind: str, jobs: Jobs, new_tokens: int,
                gap_ms: float) -> Burst:
    """Publish `jobs` one by one (each after the previous one's confirm, --gap-ms apart), then await
    every result."""
    start = time.perf_counter()
    futures = []
    for i, (prompt, adapter) in enumerate(jobs):
        if gap_ms and i:
            await asyncio.sleep(gap_ms / 1e3)
        futures.append(await publisher.publish(target, prompt, adapter, new_tokens))
    replies = await asyncio.wait_for(asyncio.gather(*futures), JOB_TIMEOUT_S)
    return Burst(target.name, kind, max(r.received for r in replies) - start, list(replies))


async def one_at_a_time(publisher: Publisher, target: Target, jobs: Jobs, new_tokens: int,
                        on_reply: Callable[[int], None]) -> list[Reply]:
    replies = []
    for prompt, adapter in jobs:
        future = await publisher.publish(target, prompt, adapter, new_tokens)
        replies.append(await asyncio.wait_for(future, JOB_TIMEOUT_S))
        on_reply(len(replies))
    return replies


def tokens_per_s(bursts: Sequence[Burst]) -> float:
    return sum(b.tokens for b in bursts) / sum(b.wall_s for b in bursts)


# ---- scenarios -----------------------------------------------------------------------------------

async def run_staggered(publisher: Publisher, loraq: Target, base: Jobs, adapters: Jobs, args: argparse.Namespace,
                        warm: bool) -> dict[str, list[Burst]]:
    if not warm:
        say("staggered: warm-up round (adapter loads, first calls), off the clock")
        await burst(publisher, loraq, "adapters", adapters, 2, 0.0)
        await burst(publisher, loraq, "base", base, 2, 0.0)
    runs: dict[str, list[Burst]] = {"base": [], "adapters": []}
    for rep in range(args.repeats):
        for kind in (("base", "adapters") if rep % 2 == 0 else ("adapters", "base")):
            b = await burst(publisher, loraq, kind, base if kind == "base" else adapters, args.new_tokens, args.gap_ms)
            runs[kind].append(b)
            say(f"staggered: round {rep + 1}/{args.repeats} {kind}: {b.tokens} tokens in {b.wall_s:.2f} s "
                f"({b.tokens / b.wall_s:.1f} tok/s)")
    return runs


async def run_rotation(publisher: Publisher, loraq: Target, sets: dict[int, list[str]], prompts: list[str],
                       args: argparse.Namespace) -> dict[int, list[Reply]]:
    out = {}
    step = max(1, args.rotation_jobs // 5)
    for n, names in sets.items():
        jobs: Jobs = [(prompts[k % len(prompts)], names[(STRIDE * k) % n]) for k in range(args.rotation_jobs)]

        def tick(done: int, n: int = n) -> None:
            if done % step == 0 or done == args.rotation_jobs:
                say(f"rotation over {n}: {done}/{args.rotation_jobs} jobs")

        out[n] = await one_at_a_time(publisher, loraq, jobs, args.rotation_new_tokens, tick)
    return out


async def run_naive(publisher: Publisher, loraq: Target, naive: Target, adapters: Jobs,
                    args: argparse.Namespace) -> dict[str, list[Burst]]:
    say("naive: warm-up round on each worker (adapter loads, first calls), off the clock")
    for target in (loraq, naive):
        await burst(publisher, target, "adapters", adapters, 2, 0.0)
    runs: dict[str, list[Burst]] = {"loraq": [], "naive": []}
    for rep in range(args.repeats):
        for target in ((loraq, naive) if rep % 2 == 0 else (naive, loraq)):
            b = await burst(publisher, target, "adapters", adapters, args.new_tokens, args.gap_ms)
            runs[target.name].append(b)
            say(f"naive: round {rep + 1}/{args.repeats} {target.name}: {b.tokens} tokens in {b.wall_s:.2f} s "
                f"({b.tokens / b.wall_s:.1f} tok/s)")
    return runs


# ---- report --------------------------------------------------------------------------------------

def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def report_staggered(runs: dict[str, list[Burst]]) -> tuple[list[str], dict[str, Any]]:
    base, adapters = tokens_per_s(runs["base"]), tokens_per_s(runs["adapters"])
    ratio = adapters / base
    per_round = [a.tokens / a.wall_s / (b.tokens / b.wall_s) for a, b in zip(runs["adapters"], runs["base"],
                                                                              strict=True)]
    lines = ["staggered arrivals (point 1): jobs published one by one, each after its confirm",
             f"  base     {base:8.1f} tok/s   walls {', '.join(f'{b.wall_s:.2f}' for b in runs['base'])} s",
             f"  adapters {adapters:8.1f} tok/s   walls {', '.join(f'{b.wall_s:.2f}' for b in runs['adapters'])} s",
             f"  adapters / base: {ratio:.3f} (rounds: {', '.join(f'{r:.3f}' for r in per_round)})   "
             f"[target >= {TARGET_STAGGERED}: {_met(ratio >= TARGET_STAGGERED)}]"]
    return lines, {"base_tok_s": round(base, 2), "adapters_tok_s": round(adapters, 2), "ratio": round(ratio, 3),
                   "ratio_per_round": [round(r, 3) for r in per_round]}


def report_rotation(replies: dict[int, list[Reply]]) -> tuple[list[str], dict[str, Any]]:
    def timing(rs: list[Reply], name: str) -> float:
        return percentile([float(r.body.get("timings", {}).get(name, float("nan"))) for r in rs], 50)

    lines = ["cold adapters in rotation (point 2): one job at a time",
             f"  {'adapters':>8s} {'jobs':>5s} {'p50 ms':>8s} {'p99 ms':>8s} {'queue_ms p50':>12s} "
             f"{'adapter_load_ms p50':>19s}"]
    numbers: dict[str, Any] = {"sets": {}}
    for n, rs in replies.items():
        latencies = [r.latency_ms for r in rs]
        row = {"jobs": len(rs), "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
               "queue_ms_p50": timing(rs, "queue_ms"), "adapter_load_ms_p50": timing(rs, "adapter_load_ms")}
        numbers["sets"][str(n)] = {k: round(v, 2) for k, v in row.items()}
        lines.append(f"  {n:8d} {len(rs):5d} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['queue_ms_p50']:12.1f} "
                     f"{row['adapter_load_ms_p50']:19.1f}")
    smallest, largest = min(replies), max(replies)
    if largest != smallest:
        ratio = numbers["sets"][str(largest)]["p50_ms"] / numbers["sets"][str(smallest)]["p50_ms"]
        numbers["p50_ratio"] = round(ratio, 3)
        lines.append(f"  p50 with {largest} / with {smallest}: {ratio:.3f}   "
                     f"[target <= {TARGET_ROTATION}: {_met(ratio <= TARGET_ROTATION)}]")
    return lines, numbers


def report_naive(runs: dict[str, list[Burst]], mode: str) -> tuple[list[str], dict[str, Any]]:
    loraq, naive = tokens_per_s(runs["loraq"]), tokens_per_s(runs["naive"])
    ratio = loraq / naive
    same = sum(a == b for a, b in zip(runs["loraq"][-1].texts, runs["naive"][-1].texts, strict=True))
    lines = [f"loraq vs a naive PEFT + aio-pika worker (point 4, naive mode {mode})",
             f"  loraq {loraq:8.1f} tok/s   naive {naive:8.1f} tok/s   loraq / naive: {ratio:.2f}   "
             f"[target >= {TARGET_NAIVE:g}: {_met(ratio >= TARGET_NAIVE)}]",
             f"  identical greedy texts: {same}/{len(runs['loraq'][-1].texts)}"]
    return lines, {"loraq_tok_s": round(loraq, 2), "naive_tok_s": round(naive, 2), "ratio": round(ratio, 3),
                   "identical_texts": f"{same}/{len(runs['loraq'][-1].texts)}"}


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


async def measure(args: argparse.Namespace, scenarios: list[str], loraq: Target, naive: Target | None,
                  base: Jobs, adapters: Jobs, sets: dict[int, list[str]], prompts: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with Publisher(args.amqp_url) as publisher:
        if "staggered" in scenarios:
            results["staggered"] = await run_staggered(publisher, loraq, base, adapters, args, warm=False)
        if "rotation" in scenarios:
            results["rotation"] = await run_rotation(publisher, loraq, sets, prompts, args)
        if "naive" in scenarios:
            assert naive is not None
            results["naive"] = await run_naive(publisher, loraq, naive, adapters, args)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.user_path", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--jobs", type=int, default=32, help="staggered / naive: jobs per burst (= distinct adapters)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--prompt-tokens", type=int, default=70)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--gap-ms", type=float, default=0.0, help="pause between publishes (beyond each confirm)")
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds per kind / per worker, taking turns")
    ap.add_argument("--rotation-sets", default="1,100,1000")
    ap.add_argument("--rotation-jobs", type=int, default=200, help="jobs per set, one at a time")
    ap.add_argument("--rotation-rank", type=int, default=8)
    ap.add_argument("--rotation-new-tokens", type=int, default=10)
    ap.add_argument("--naive-mode", choices=("batch", "serial"), default="batch")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--worker-args", default="", help="more `loraq worker` flags, one string")
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--json", dest="json_out", metavar="FILE", help="also write the numbers as JSON to FILE")
    args = ap.parse_args(argv)
    scenarios = [s for s in SCENARIOS if s in args.scenarios.split(",")]
    if not scenarios:
        ap.error(f"--scenarios: some of {', '.join(SCENARIOS)}")
    set_sizes = sorted({int(n) for n in args.rotation_sets.split(",")})

    say(f"reading the config and tokenizer of {args.model} ...")
    spec, tokenizer = model_spec(args.model), model_tokenizer(args.model)
    count = max(args.jobs, args.rotation_jobs)
    prompts = [tokenizer.decode(ids) for ids in make_prompts(tokenizer, count, args.prompt_tokens)]
    root = Path(tempfile.mkdtemp(prefix="loraq-bench-user-"))
    distinct = [f"distinct/a{i:03d}" for i in range(args.jobs)]
    sets = {n: [f"rotation/s{n}/a{i:04d}" for i in range(n)] for n in set_sizes} if "rotation" in scenarios else {}
    base: Jobs = [(prompts[i], None) for i in range(args.jobs)]
    adapters: Jobs = [(prompts[i], distinct[i]) for i in range(args.jobs)]
    topology = Topology.prefixed(f"loraq-bench-user-{uuid.uuid4().hex[:8]}")
    flags = ["--amqp-url", args.amqp_url, *topology_args(topology), "--model", args.model,
             "--adapter-root", str(root), "--max-batch", str(args.max_batch),
             "--prefetch", str(max(64, 2 * args.jobs)), "--adapter-slots", str(max(32, args.jobs)),
             "--max-lora-rank", str(max(args.rank, args.rotation_rank)), *shlex.split(args.worker_args)]
    logs = Path(tempfile.mkdtemp(prefix="loraq-bench-user-logs-"))
    workers = [WorkerProcess(flags, logs / "loraq-worker.log", free_port())]
    naive: Target | None = None
    if "naive" in scenarios:
        queue = f"loraq-bench-naive-{uuid.uuid4().hex[:8]}"
        naive = Target("naive", "", queue)
        naive_flags = ["--queue", queue, "--adapter-root", str(root), "--model", args.model, "--amqp-url",
                       args.amqp_url, "--max-batch", str(args.max_batch),
                       *(["--batch"] if args.naive_mode == "batch" else [])]
        workers.append(WorkerProcess(naive_flags, logs / "naive-worker.log", free_port(),
                                     command=(sys.executable, "-m", "benchmarks.naive_worker")))
    ok = False
    try:
        for w in workers:  # they load their models while the adapters are written
            w.start()
        say(f"workers started, logs in {logs}; loraq worker flags: {shlex.join(flags)}")
        if "staggered" in scenarios or "naive" in scenarios:
            write_adapters(root, distinct, spec, args.rank, parse_targets(args.targets),
                           f"{args.jobs} rank-{args.rank} adapters")
        for n, names in sets.items():
            write_adapters(root, names, spec, args.rotation_rank, parse_targets(args.targets),
                           f"rotation set of {n} rank-{args.rotation_rank} adapters")
        for w in workers:
            asyncio.run(w.wait_healthy(START_TIMEOUT_S, every(10.0, w.log_path.stem)))
        say(f"workers ready; measuring {', '.join(scenarios)} ...")
        loraq = Target("loraq", topology.exchange, topology.routing_key)
        results = asyncio.run(measure(args, scenarios, loraq, naive, base, adapters, sets, prompts))
        ok = True
    finally:
        codes = [w.stop() for w in workers]
        asyncio.run(delete_topology(args.amqp_url, topology))
        if naive is not None:
            asyncio.run(_delete_queue(args.amqp_url, naive.routing_key))
        shutil.rmtree(root, ignore_errors=True)
        for w, code in zip(workers, codes, strict=True):
            if not ok or code not in (0, -signal.SIGTERM):
                print(f"{w.log_path.stem} exited with code {code}; its log ({w.log_path}) ends:\n{w.log_tail()}",
                      file=sys.stderr)

    lines = [f"user-path benchmark: {spec.base_model_name}, through RabbitMQ at {args.amqp_url}, "
             f"~{args.prompt_tokens}-token prompts, greedy", ""]
    numbers: dict[str, Any] = {"workload": {k: v for k, v in vars(args).items() if k != "json_out"}}
    if "staggered" in results:
        text, numbers["staggered"] = report_staggered(results["staggered"])
        lines += [f"{args.jobs} jobs x {args.new_tokens} new tokens, rank-{args.rank} adapters on {args.targets}",
                  *text, ""]
    if "rotation" in results:
        text, numbers["rotation"] = report_rotation(results["rotation"])
        lines += [f"rank-{args.rotation_rank} adapters, {args.rotation_new_tokens} new tokens per job", *text, ""]
    if "naive" in results:
        text, numbers["naive"] = report_naive(results["naive"], args.naive_mode)
        lines += text
    print("\n" + "\n".join(lines).rstrip())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


async def _delete_queue(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


if __name__ == "__main__":
    sys.exit(main())
