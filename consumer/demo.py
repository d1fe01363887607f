"""`loraq demo` / `python -m consumer.demo`: the whole path on one machine, in one command.

Starts a worker subprocess (embedded SmolLM2, adapter root ./adapters, so the demo adapters are
demo/pirate, demo/shakespeare and demo/emoji, the ids the README uses), waits until its /healthz answers,
publishes the same prompts to the base model and to every adapter at once through
`consumer.client.Client` (so they share batches), prints each answer with its timings, streams one
answer token by token, then stops the worker with SIGTERM.

The worker gets its own topology names (removed at the end) and a free metrics port, so the demo
never mixes with a worker already serving the default queue (`consumer.worker_process`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from consumer.client import DEFAULT_AMQP_URL, Client, GenerationResult, LoraqError, Token
from consumer.protocol import Topology
from consumer.worker_process import REPO_ROOT, WORKER_COMMAND, WorkerProcess, delete_topology, free_port, topology_args

PROMPTS = (
    "What is the capital of France?",
    "Give me one tip for staying healthy.",
    "Describe the ocean in one sentence.",
)
STREAM_PROMPT = "Tell me about your favourite animal."
STREAM_ADAPTER = "demo/pirate"
BASE = "base"  # how the base model is labelled in the printout


def find_adapters(root: Path) -> list[str]:
    """Adapter ids (paths relative to `root`) of every PEFT adapter directory under it."""
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob("adapter_config.json"))


def default_adapter_root() -> Path:
    for candidate in (Path.cwd() / "adapters", REPO_ROOT / "adapters"):
        if (candidate / "demo").is_dir():
            return candidate
    return REPO_ROOT / "adapters"


@dataclass
class Answer:
    adapter: str
    prompt: str
    result: GenerationResult | None
    error: str | None
    round_trip_ms: float


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "?"
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.0f} ms"


def print_answers(answers: list[Answer], width: int) -> None:
    """One block per prompt: each adapter's timings, then its text (whitespace folded, wrapped)."""
    label = max(len(a.adapter) for a in answers) + 2
    indent = " " * (label + 2)
    for prompt in dict.fromkeys(a.prompt for a in answers):
        print(f"\n== {prompt}")
        for a in (a for a in answers if a.prompt == prompt):
            if a.result is None:
                print(f"  {a.adapter:<{label}}FAILED: {a.error}")
                continue
            t, d = a.result.timings, a.result.details
            print(f"  {a.adapter:<{label}}queue {fmt_ms(t.queue_ms)} | adapter load "
                  f"{fmt_ms(t.adapter_load_ms)} | ttft {fmt_ms(t.ttft_ms)} | total "
                  f"{fmt_ms(t.total_ms)} | round trip {fmt_ms(a.round_trip_ms)} | "
                  f"{d.generated_tokens} tokens ({d.finish_reason})")
            text = " ".join(a.result.generated_text.split()) or "(empty)"
            print(textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent))


def batch_summary(metrics_port: int) -> str:
    """From the worker's /metrics: how the jobs were grouped into engine batches."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return ""
    values = {s.name: s.value for fam in text_string_to_metric_families(text)
              for s in fam.samples if s.name.startswith(("loraq_batch_size", "loraq_batch_adapters"))}
    groups = values.get("loraq_batch_size_count", 0)
    if not groups:
        return ""
    return (f"worker: {values.get('loraq_batch_size_sum', 0):.0f} jobs reached the engine in "
            f"{groups:.0f} group(s), on average {values.get('loraq_batch_adapters_sum', 0) / groups:.1f}"
            f" distinct adapters (base counts as one) per group")


async def run_demo(args: argparse.Namespace) -> int:
    adapter_root = Path(args.adapter_root).resolve()
    adapters = find_adapters(adapter_root) if adapter_root.is_dir() else []
    if not adapters:
        print(f"loraq demo: no PEFT adapters under {adapter_root} (the base model alone is shown)",
              file=sys.stderr)
    topology = Topology.prefixed(f"loraq-demo-{uuid.uuid4().hex[:8]}")

    # The broker first: a missing broker is a one-line error, not a model load later.
    try:
        client = await Client(args.amqp_url, topology=topology, timeout=args.timeout).connect()
    except (ConnectionError, OSError) as e:
        print(f"loraq demo: cannot reach RabbitMQ at {args.amqp_url.split('@')[-1]}: {e}\n"
              f"  start it (e.g. `rabbitmq-server -detached`) or pass --amqp-url", file=sys.stderr)
        return 1

    log_dir = Path(tempfile.mkdtemp(prefix="loraq-demo-"))
    worker = WorkerProcess(
        ["--model", args.model, "--adapter-root", str(adapter_root), "--amqp-url", args.amqp_url,
         "--device", args.device, *topology_args(topology)],
        log_dir / "worker.log", free_port(), command=WORKER_COMMAND)  # tests patch demo.WORKER_COMMAND
    tty = sys.stdout.isatty()
    last_print = [0.0]

    def progress(elapsed: float, event: str) -> None:
        line = f"  loading {args.model} model ... {elapsed:5.1f} s  {event}"
        if tty:
            print(f"\r{line:<78}", end="", flush=True)
        elif elapsed - last_print[0] >= 5:
            last_print[0] = elapsed
            print(line, flush=True)

    failed = 0
    try:
        print(f"starting a worker: model {args.model}, adapters {', '.join(adapters) or '(none)'} "
              f"from {adapter_root}\n  (log: {worker.log_path})", flush=True)
        worker.start()
        ready_s = await worker.wait_healthy(args.start_timeout, progress)
        print(f"{chr(13) if tty else ''}worker ready after {ready_s:.1f} s{' ' * 50}", flush=True)

        # Every (adapter, prompt) at once: the worker collects them into shared batches.
        jobs = [(adapter, prompt) for prompt in PROMPTS for adapter in [None, *adapters]]
        print(f"\npublishing {len(jobs)} jobs at once ({len(PROMPTS)} prompts x "
              f"{len(adapters) + 1} variants, greedy, max {args.max_new_tokens} new tokens) ...",
              flush=True)

        async def one(adapter: str | None, prompt: str) -> Answer:
            start = time.perf_counter()
            try:
                result = await client.generate(messages=[{"role": "user", "content": prompt}],
                                               adapter_id=adapter,
                                               max_new_tokens=args.max_new_tokens)
                error = None
            except LoraqError as e:
                result, error = None, str(e)
            return Answer(adapter or BASE, prompt, result, error,
                          (time.perf_counter() - start) * 1000)

        start = time.perf_counter()
        answers = await asyncio.gather(*(one(a, p) for a, p in jobs))
        wall = time.perf_counter() - start
        print_answers(answers, args.width)
        failed = sum(a.result is None for a in answers)
        tokens = sum(a.result.details.generated_tokens for a in answers if a.result)
        print(f"\n{len(answers) - failed}/{len(answers)} jobs answered in {wall:.2f} s "
              f"({tokens} tokens, {tokens / wall:.1f} tokens/s across the batch)")
        summary = batch_summary(worker.metrics_port)
        if summary:
            print(summary)

        stream_adapter = STREAM_ADAPTER if STREAM_ADAPTER in adapters else next(iter(adapters), None)
        print(f"\nstreaming from {stream_adapter or BASE}: {STREAM_PROMPT}\n  ", end="", flush=True)
        start = time.perf_counter()
        first_token_ms = None
        try:
            async for item in client.generate_stream(
                    messages=[{"role": "user", "content": STREAM_PROMPT}],
                    adapter_id=stream_adapter, max_new_tokens=args.max_new_tokens):
                if isinstance(item, Token):
                    if first_token_ms is None:
                        first_token_ms = (time.perf_counter() - start) * 1000
                    print(item.text.replace("\n", "\n  "), end="", flush=True)
                else:
                    print(f"\n  [{item.details.generated_tokens} tokens streamed; "
                          f"first after {fmt_ms(first_token_ms)}, all after "
                          f"{fmt_ms((time.perf_counter() - start) * 1000)}]")
        except LoraqError as e:
            print(f"\n  FAILED: {e}")
            failed += 1
    except RuntimeError as e:
        print(f"\nloraq demo: {e}", file=sys.stderr)
        failed += 1
    finally:
        await client.close()
        print("\nstopping the worker (SIGTERM) ...", flush=True)
        code = await asyncio.to_thread(worker.stop)
        print(f"worker exited with code {code}")
        await delete_topology(args.amqp_url, topology)
    if code not in (0, -signal.SIGTERM):
        print(f"loraq demo: the worker exited with code {code}; its log:\n{worker.log_tail()}",
              file=sys.stderr)
        failed += 1
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loraq demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="base model (default: embedded SmolLM2-135M)")
    ap.add_argument("--adapter-root", default=str(default_adapter_root()),
                    help="the worker's adapter root; every PEFT adapter under it joins the demo "
                         "(default: ./adapters)")
    ap.add_argument("--amqp-url", default=os.environ.get("LORAQ_AMQP_URL") or DEFAULT_AMQP_URL,
                    help="broker URL (env LORAQ_AMQP_URL)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--start-timeout", type=float, default=600.0,
                    help="seconds to wait for the worker to load the model and connect")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each job")
    ap.add_argument("--width", type=int, default=100, help="wrap answers at this width")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="replace")  # the emoji adapter on a non-UTF-8 terminal
    try:
        return asyncio.run(run_demo(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
