"""Gateway benchmark (issue 14): what HTTP through `loraq gateway` adds over publishing to the broker.

    python -m benchmarks.gateway                       # the embedded SmolLM2, greedy, base model
    python -m benchmarks.gateway --model ./tiny-model --serial-jobs 8 --jobs 8 --repeats 1

One worker process (`python -m consumer`) and one gateway process (`loraq gateway`) on a throwaway
topology; this process drives the same workload down both paths:

    direct    `consumer.client.Client.generate` publishes the job to the broker itself
    gateway   POST /generate to the gateway (keep-alive HTTP, as a load balancer would hold it),
              which publishes the same job and answers with its result

    serial    one job at a time, the two paths alternating (which goes first alternates too):
              the gateway's added latency is the median of the paired differences
    burst     --jobs at once per path, paths taking turns (--repeats bursts each): throughput

Targets: < 2 ms added p50, gateway / direct throughput >= 0.95. Texts must agree (greedy). No torch
in this process: the prompts are slices of a fixed text, so the engine's work is in the worker only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

import aiohttp

from benchmarks.common import SEED_TEXT, percentile, summary
from benchmarks.common import progress as _progress
from consumer.client import DEFAULT_AMQP_URL, Client
from consumer.protocol import Topology
from consumer.worker_process import REPO_ROOT, WorkerProcess, delete_topology, free_port, topology_args

START_TIMEOUT_S = 600.0
JOB_TIMEOUT_S = 600.0
TARGET_ADDED_MS = 2.0
TARGET_RATIO = 0.95

say = partial(_progress, "gateway")


def prompts(n: int, chars: int) -> list[str]:
    """n distinct prompts of `chars` characters (rotated slices of one text)."""
    text = SEED_TEXT * 8
    return [text[(31 * i) % 400:(31 * i) % 400 + chars] for i in range(n)]


class Paths:
    """The two ways to run a job; each call returns (latency ms, generated text)."""

    def __init__(self, client: Client, session: aiohttp.ClientSession, url: str, new_tokens: int) -> None:
        self.client = client
        self.session = session
        self.url = url
        self.new_tokens = new_tokens

    async def direct(self, prompt: str) -> tuple[float, str]:
        start = time.perf_counter()
        result = await self.client.generate(prompt, max_new_tokens=self.new_tokens, timeout=JOB_TIMEOUT_S)
        return (time.perf_counter() - start) * 1000, result.generated_text

    async def gateway(self, prompt: str) -> tuple[float, str]:
        start = time.perf_counter()
        body = {"inputs": prompt, "parameters": {"max_new_tokens": self.new_tokens}}
        async with self.session.post(f"{self.url}/generate", json=body) as resp:
            payload = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"gateway answered {resp.status}: {payload}")
        return (time.perf_counter() - start) * 1000, payload["generated_text"]


async def serial(paths: Paths, jobs: list[str]) -> dict:
    direct, gateway, diffs, mismatches = [], [], [], 0
    for i, prompt in enumerate(jobs):
        order = (paths.direct, paths.gateway) if i % 2 == 0 else (paths.gateway, paths.direct)
        (a_ms, a_text), (b_ms, b_text) = [await run(prompt) for run in order]
        d_ms, g_ms = (a_ms, b_ms) if i % 2 == 0 else (b_ms, a_ms)
        direct.append(d_ms)
        gateway.append(g_ms)
        diffs.append(g_ms - d_ms)
        mismatches += a_text != b_text
    return {"direct_ms": summary(direct), "gateway_ms": summary(gateway),
            "added_p50_ms": percentile(diffs, 50), "mismatches": mismatches}


async def burst(paths: Paths, jobs: list[str], repeats: int) -> dict:
    walls = {"direct": 0.0, "gateway": 0.0}
    latencies: dict[str, list[float]] = {"direct": [], "gateway": []}
    texts: dict[str, list[str]] = {"direct": [], "gateway": []}
    for r in range(repeats):
        order = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
        for name in order:
            run = getattr(paths, name)
            start = time.perf_counter()
            out = await asyncio.gather(*(run(p) for p in jobs))
            walls[name] += time.perf_counter() - start
            latencies[name] += [ms for ms, _ in out]
            texts[name] += [t for _, t in out]
            say(f"burst {r + 1}/{repeats} {name}: {len(jobs) / (time.perf_counter() - start):.2f} jobs/s")
    n = len(jobs) * repeats
    rates = {name: n / walls[name] for name in walls}
    return {"direct_jobs_per_s": rates["direct"], "gateway_jobs_per_s": rates["gateway"],
            "ratio": rates["gateway"] / rates["direct"],
            "direct_ms": summary(latencies["direct"]), "gateway_ms": summary(latencies["gateway"]),
            "mismatches": sum(a != b for a, b in zip(texts["direct"], texts["gateway"], strict=True))}


async def wait_gateway(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until the gateway's /health is 200 (broker connected and a worker consuming)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with code {proc.returncode}")
            try:
                async with session.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the gateway was not healthy after {timeout:.0f} s")


async def measure(args: argparse.Namespace, topology: Topology, url: str) -> dict:
    work = prompts(max(args.jobs, args.serial_jobs) + 1, args.prompt_chars)
    connector = aiohttp.TCPConnector(limit=0)  # every burst job in flight at once
    async with Client(args.amqp_url, topology=topology, timeout=JOB_TIMEOUT_S) as client, \
            aiohttp.ClientSession(connector=connector,
                                  timeout=aiohttp.ClientTimeout(total=JOB_TIMEOUT_S)) as session:
        paths = Paths(client, session, url, args.new_tokens)
        await paths.direct(work[-1])  # warm-up, off the clock: first job, connections, caches
        await paths.gateway(work[-1])
        say(f"serial: {args.serial_jobs} jobs per path, alternating")
        one_by_one = await serial(paths, work[:args.serial_jobs])
        say(f"burst: {args.jobs} jobs at once, {args.repeats} bursts per path")
        together = await burst(paths, work[:args.jobs], args.repeats)
    return {"serial": one_by_one, "burst": together}


def report(args: argparse.Namespace, numbers: dict) -> str:
    s, b = numbers["serial"], numbers["burst"]
    rows = [("serial", "direct", s["direct_ms"], None), ("serial", "gateway", s["gateway_ms"], None),
            ("burst", "direct", b["direct_ms"], b["direct_jobs_per_s"]),
            ("burst", "gateway", b["gateway_ms"], b["gateway_jobs_per_s"])]
    lines = [f"gateway benchmark: model {args.model}, {args.new_tokens} new tokens, "
             f"~{args.prompt_chars}-char prompts, greedy, base model",
             "| load | path | jobs | jobs/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for load, path, lat, rate in rows:
        lines.append(f"| {load} | {path} | {lat['n']} | {'' if rate is None else f'{rate:.2f}'} | "
                     f"{lat['p50']:.1f} | {lat['p99']:.1f} |")
    lines.append(f"- added p50, serial (median of paired differences): {s['added_p50_ms']:+.2f} ms "
                 f"(target < {TARGET_ADDED_MS:g} ms)")
    lines.append(f"- throughput gateway / direct, burst: {b['ratio']:.3f} (target >= {TARGET_RATIO})")
    lines.append(f"- texts that differ between the paths: {s['mismatches'] + b['mismatches']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gateway", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded", help="the worker's --model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--serial-jobs", type=int, default=32, help="jobs one at a time, per path")
    ap.add_argument("--jobs", type=int, default=32, help="jobs in each burst")
    ap.add_argument("--repeats", type=int, default=2, help="bursts per path (interleaved)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--prompt-chars", type=int, default=300)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    ap.add_argument("--json", dest="json_out", metavar="FILE", help="also write the numbers as JSON")
    args = ap.parse_args(argv)

    topology = Topology.prefixed(f"loraq-bench-{uuid.uuid4().hex[:8]}")
    log_dir = Path(tempfile.mkdtemp(prefix="loraq-bench-gateway-"))
    worker = WorkerProcess(
        ["--amqp-url", args.amqp_url, *topology_args(topology), "--model", args.model,
         "--device", args.device, "--dtype", args.dtype, "--max-batch", str(args.max_batch),
         "--prefetch", str(max(args.jobs, args.max_batch)), "--log-level", "warning"],
        log_dir / "worker.log", free_port())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    gateway_cmd = [sys.executable, "-m", "consumer.cli", "gateway", "--host", "127.0.0.1",
                   "--port", str(port), "--amqp-url", args.amqp_url, "--exchange", topology.exchange,
                   "--routing-key", topology.routing_key, "--queue", topology.queue,
                   "--request-timeout-s", str(JOB_TIMEOUT_S), "--log-level", "warning"]
    gateway = None
    try:
        say(f"starting the worker ({args.model}) and the gateway; logs in {log_dir}")
        worker.start()
        with open(log_dir / "gateway.log", "wb") as log:
            gateway = subprocess.Popen(gateway_cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        asyncio.run(worker.wait_healthy(START_TIMEOUT_S))
        asyncio.run(wait_gateway(url, gateway, 60))
        numbers = asyncio.run(measure(args, topology, url))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        worker.stop()
        asyncio.run(delete_topology(args.amqp_url, topology))

    print(report(args, numbers))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), **numbers}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
