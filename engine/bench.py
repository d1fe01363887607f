"""Engine benchmark (issue 2): one run, one model, the same prompts, side by side.

    python -m engine.bench            # or: loraq bench engine

(a) loraq, base model alone          (b) loraq, N distinct adapters, one per request
(c) transformers `generate`, base, padded static batch
(d) PEFT mixed batch (`adapter_names`) (e) PEFT one request at a time
(a)-(d) are timed --repeats times, taking turns. Prints tokens/s for each (medians) and the ratios
the README quotes (medians of the ratios within each repeat). Throughput counts generated tokens
(every request runs exactly --new-tokens; EOS is ignored so all systems do the same work). Each
system has the cores to itself: see `on_own_thread`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import structlog
import torch
from safetensors.torch import save_file

from engine.config import EngineConfig
from engine.request import AdapterRef, GenerationRequest, Completion, SamplingParams

T = TypeVar("T")


def progress(message: str) -> None:
    print(f"[bench engine {time.strftime('%H:%M:%S')}] {message}", flush=True)


SEED_TEXT = (
    "The quarterly report covers revenue, churn and support tickets for every region. "
    "Customers asked about invoices, password resets, delivery delays and refunds. "
    "Summarise the main issues, list the three most urgent actions, and suggest a reply "
    "template that a support agent could send to an unhappy customer today. "
)


def make_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` token ids (rotated views of one long text)."""
    ids = tokenizer(SEED_TEXT * 8, add_special_tokens=False)["input_ids"]
    return [ids[(7 * i) % 200:(7 * i) % 200 + length] for i in range(n)]


def write_random_adapter(out_dir: Path, module_shapes: dict[str, tuple[int, int]], num_layers: int,
                         r: int, targets: tuple[str, ...], seed: int, base_name: str) -> Path:
    """A PEFT-format LoRA adapter with random weights (small enough to keep text sane)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for m in targets:
            fan_in, fan_out = module_shapes[m]
            part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=gen) * 0.02
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
           "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
           "base_model_name_or_path": base_name, "use_rslora": False, "use_dora": False}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg))
    return out_dir


def write_random_adapters(root: Path, names: list[str], spec, r: int, targets: tuple[str, ...]) -> None:
    """`write_random_adapter` for each name (seed: its index), on a thread of its own (see
    `on_own_thread`): the caller's thread then starts no OpenMP pool beside the engine's."""
    def write_all() -> None:
        for i, name in enumerate(names):
            write_random_adapter(root / name, spec.module_shapes, spec.num_layers, r, targets, i,
                                 spec.base_model_name)

    on_own_thread(write_all)


def run_engine(engine, prompts: list[list[int]], new_tokens: int,
               adapters: list[str | None]) -> tuple[float, list[Completion]]:
    """Submit every request at once; wall seconds until the last finishes, and the results."""
    done = threading.Event()
    results: dict[str, object] = {}
    lock = threading.Lock()

    def on_finish(outcome) -> None:
        with lock:
            results[outcome.request_id] = outcome
            if len(results) == len(prompts):
                done.set()

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.submit_many([(GenerationRequest(id=f"r{i}", prompt_token_ids=ids, params=params,
                                           adapter=AdapterRef(adapter) if adapter else None), None, on_finish)
                        for i, (ids, adapter) in enumerate(zip(prompts, adapters))])
    done.wait()
    elapsed = time.perf_counter() - start
    ordered = [results[f"r{i}"] for i in range(len(prompts))]
    failed = [o for o in ordered if not isinstance(o, Completion)]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]}")
    return elapsed, ordered


def on_own_thread(fn: Callable[[], T]) -> T:
    """fn() on a new thread that ends with it. A thread that ran a parallel torch op keeps an
    OpenMP pool until it ends, and with more OpenMP threads than cores libgomp stops spinning in
    every pool, slowing small ops (see `Engine.__init__`). So the main thread runs no torch
    op, transformers runs on threads that end with each run, and the engine is down meanwhile:
    every system has the cores to itself, as it would in production."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def load_peft(hf, root: Path, names: list[str]):
    """A PeftModel with every adapter, on a copy of the model (PEFT wraps layers in place, and (c)
    runs the plain model)."""
    import copy

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(root / name), adapter_name=name)
    return peft_model.eval()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int, **kw) -> tuple[float, list[list[int]]]:
    """transformers `generate` on a left-padded static batch; seconds and new token ids per row."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        # eos_token_id=None runs every row to max_new_tokens like loraq's ignore_eos; min_new_tokens
        # would instead forbid EOS and so change which tokens are chosen
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             eos_token_id=None, do_sample=False, pad_token_id=pad_id, **kw)
    return time.perf_counter() - start, out[:, width:].tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loraq bench engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=70)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of (a)-(d), taken in turn; medians")
    ap.add_argument("--peft-serial", type=int, default=8, help="requests timed for (e)")
    ap.add_argument("--skip-hf", action="store_true", help="only (a) and (b)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", dest="json_out", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    # the engine's per-request events would drown the table; progress lines are printed instead
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    n, new = args.requests, args.new_tokens
    total_tokens = n * new

    from engine.engine import Engine

    root = Path(tempfile.mkdtemp(prefix="loraq-bench-"))
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, adapter_root=str(root),
                          max_batch=n, adapter_slots=max(n, 1), max_lora_rank=args.rank)
    progress(f"loading {args.model} ...")
    engine = Engine(config)
    model, spec, tok = engine.model, engine.spec, engine.tokenizer
    prompts = make_prompts(tok, n, args.prompt_tokens)
    names = [f"bench/a{i:03d}" for i in range(n)]
    write_random_adapters(root, names, spec, args.rank, targets)
    progress(f"wrote {n} random rank-{args.rank} adapters on {','.join(targets)}")

    def warm_up(engine) -> float:
        """First-call overheads and the adapter loads (source -> host -> device slots), off the clock."""
        cold_s, _ = run_engine(engine, prompts, 2, names)
        run_engine(engine, prompts, 2, [None] * n)
        return cold_s

    progress("warm-up (cold adapter loads, first calls)")
    cold_s = warm_up(engine)
    # each system: () -> (seconds, outputs); the last outputs of (b) and (d) are compared
    loraq = {"a_loraq_base": lambda: run_engine(engine, prompts, new, [None] * n),
             "b_loraq_adapters": lambda: run_engine(engine, prompts, new, names)}
    hf_systems = {}
    peft_model, pad = None, None
    if not args.skip_hf:
        hf = model.hf_model  # the weights the engine runs on, as transformers runs them
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        t0 = time.perf_counter()
        peft_model = on_own_thread(lambda: load_peft(hf, root, names))
        progress(f"PEFT: {n} adapters loaded in {time.perf_counter() - t0:.1f} s")
        on_own_thread(lambda: (hf_generate(hf, prompts[:2], 2, pad),  # warm-up
                               hf_generate(peft_model, prompts[:2], 2, pad, adapter_names=names[:2])))
        hf_systems["c_hf_generate_base"] = lambda: on_own_thread(lambda: hf_generate(hf, prompts, new, pad))
        hf_systems["d_peft_mixed_batch"] = lambda: on_own_thread(
            lambda: hf_generate(peft_model, prompts, new, pad, adapter_names=names))

    # every system once per repeat, in turn, so that the machine's background load hits all alike;
    # the engine is down while transformers runs (see on_own_thread) and restarted, warm, after
    times: dict[str, list[float]] = {key: [] for key in [*loraq, *hf_systems]}
    outputs: dict[str, list] = {}
    for rep in range(args.repeats):
        if engine is None:
            engine = Engine(config, model=model)
            warm_up(engine)
        for key, run in loraq.items():
            seconds, outputs[key] = run()
            times[key].append(seconds)
        if hf_systems:
            engine_stats = engine.stats()
            engine.shutdown()
            engine = None
            for key, run in hf_systems.items():
                seconds, outputs[key] = run()
                times[key].append(seconds)
        progress(f"repeat {rep}: " + ", ".join(f"{key.split('_')[0]} {t[-1]:.2f} s" for key, t in times.items()))
    tps = {key: total_tokens / statistics.median(t) for key, t in times.items()}

    agreement = None
    if peft_model is not None:
        agreement = sum(list(r.token_ids) == d for r, d in
                        zip(outputs["b_loraq_adapters"], outputs["d_peft_mixed_batch"])) / n
        k = min(args.peft_serial, n)

        def one_at_a_time() -> float:
            seconds = 0.0
            for i in range(k):
                peft_model.set_adapter(names[i])
                seconds += hf_generate(peft_model, prompts[i:i + 1], new, pad)[0]
            return seconds

        tps["e_peft_one_at_a_time"] = k * new / on_own_thread(one_at_a_time)
    if engine is not None:
        engine_stats = engine.stats()
        engine.shutdown()

    def paired(x: str, y: str) -> float:
        """Throughput of x / y: the median over repeats of t_y / t_x. A repeat runs the systems back
        to back, so each of its ratios compares runs under the same background load."""
        return statistics.median(t_y / t_x for t_x, t_y in zip(times[x], times[y]))

    ratios = {"b/a": paired("b_loraq_adapters", "a_loraq_base")}
    if "c_hf_generate_base" in tps:
        ratios["a/c"] = paired("a_loraq_base", "c_hf_generate_base")
        ratios["b/d"] = paired("b_loraq_adapters", "d_peft_mixed_batch")
        ratios["d/c"] = paired("d_peft_mixed_batch", "c_hf_generate_base")
        ratios["e/c"] = tps["e_peft_one_at_a_time"] / tps["c_hf_generate_base"]

    print(f"\nengine benchmark: {n} requests x {args.prompt_tokens} prompt tokens x {new} new tokens, "
          f"rank {args.rank} on {','.join(targets)}, device {config.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'system':34s} {'tok/s':>8s}")
    for key, value in tps.items():
        print(f"{key:34s} {value:8.1f}")
    for key, value in ratios.items():
        print(f"ratio {key:28s} {value:8.2f}")
    print(f"cold first batch with {n} adapter loads: {cold_s:.2f} s (2 new tokens)")
    if agreement is not None:
        print(f"greedy token agreement loraq (b) vs PEFT (d): {agreement:.0%} of rows")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"tok_per_s": tps, "ratios": ratios,
                                                   "engine_stats": engine_stats}, default=str, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
