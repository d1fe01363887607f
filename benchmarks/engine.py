"""Engine benchmark (issue 2): one run, one model, the same prompts, side by side.

    python -m benchmarks.engine            # or: loraq bench engine

(a) loraq, base model alone          (b) loraq, N distinct adapters, one per request
(c) transformers `generate`, base, padded static batch
(d) PEFT mixed batch (`adapter_names`) (e) PEFT one request at a time
(a)-(d) are timed --repeats times, taking turns. Prints tokens/s for each (medians) and the ratios
the README quotes (medians of the ratios within each repeat). Throughput counts generated tokens
(every request runs exactly --new-tokens; EOS is ignored so all systems do the same work). Each
system has the cores to itself: transformers runs on threads that end with each run while the
engine is shut down (README, "CPU threads").
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import torch

from benchmarks.common import make_prompts, on_own_thread, parse_targets, run_all, write_random_adapters
from benchmarks.common import progress as _progress
from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import AdapterRef, Completion, GenerationRequest, SamplingParams

progress = partial(_progress, "engine")


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int,
               adapters: Sequence[str | None]) -> tuple[float, list[Completion]]:
    """Submit every request at once; wall seconds until the last finishes, and the results."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return run_all(engine, [GenerationRequest(id=f"r{i}", prompt_token_ids=ids, params=params,
                                              adapter=AdapterRef(adapter) if adapter else None)
                            for i, (ids, adapter) in enumerate(zip(prompts, adapters, strict=True))])


def load_peft(hf: Any, root: Path, names: list[str]) -> Any:
    """A PeftModel with every adapter, on a copy of the model (PEFT wraps layers in place, and (c)
    runs the plain model)."""
    import copy

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(root / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(root / name), adapter_name=name)
    return peft_model.eval()


def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int, pad_id: int,
                **kw: Any) -> tuple[float, list[list[int]]]:
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
    targets = parse_targets(args.targets)
    n, new = args.requests, args.new_tokens
    total_tokens = n * new

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

    def warm_up(engine: Engine) -> float:
        """First-call overheads and the adapter loads (source -> host -> device slots), off the clock."""
        cold_s, _ = run_engine(engine, prompts, 2, names)
        run_engine(engine, prompts, 2, [None] * n)
        return cold_s

    progress("warm-up (cold adapter loads, first calls)")
    cold_s = warm_up(engine)
    # each system: () -> (seconds, outputs); the last outputs of (b) and (d) are compared
    loraq: dict[str, Callable[[Engine], tuple[float, list[Any]]]] = {
        "a_loraq_base": lambda engine: run_engine(engine, prompts, new, [None] * n),
        "b_loraq_adapters": lambda engine: run_engine(engine, prompts, new, names)}
    hf_systems: dict[str, Callable[[], tuple[float, list[Any]]]] = {}
    peft_model: Any = None
    pad = 0
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
    # the engine is down while transformers runs (README, "CPU threads") and restarted, warm, after
    times: dict[str, list[float]] = {key: [] for key in [*loraq, *hf_systems]}
    outputs: dict[str, list[Any]] = {}
    engine_stats: dict[str, Any] = {}
    running: Engine | None = engine
    for rep in range(args.repeats):
        if running is None:
            running = Engine(config, model=model)
            warm_up(running)
        for key, run_loraq in loraq.items():
            seconds, outputs[key] = run_loraq(running)
            times[key].append(seconds)
        if hf_systems:
            engine_stats = running.stats()
            running.shutdown()
            running = None
            for key, run_hf in hf_systems.items():
                seconds, outputs[key] = run_hf()
                times[key].append(seconds)
        progress(f"repeat {rep}: " + ", ".join(f"{key.split('_')[0]} {t[-1]:.2f} s" for key, t in times.items()))
    tps = {key: total_tokens / statistics.median(t) for key, t in times.items()}

    agreement = None
    if peft_model is not None:
        agreement = sum(list(r.token_ids) == d for r, d in
                        zip(outputs["b_loraq_adapters"], outputs["d_peft_mixed_batch"], strict=True)) / n
        k = min(args.peft_serial, n)

        def one_at_a_time() -> float:
            seconds = 0.0
            for i in range(k):
                peft_model.set_adapter(names[i])
                seconds += hf_generate(peft_model, prompts[i:i + 1], new, pad)[0]
            return seconds

        tps["e_peft_one_at_a_time"] = k * new / on_own_thread(one_at_a_time)
    if running is not None:
        engine_stats = running.stats()
        running.shutdown()

    def paired(x: str, y: str) -> float:
        """Throughput of x / y: the median over repeats of t_y / t_x. A repeat runs the systems back
        to back, so each of its ratios compares runs under the same background load."""
        return statistics.median(t_y / t_x for t_x, t_y in zip(times[x], times[y], strict=True))

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
