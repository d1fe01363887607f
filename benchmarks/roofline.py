"""Roofline of a decode step (issue 12 point 5): how far loraq's batched decode step is from what
this CPU could do, and where the time goes.

    python -m benchmarks.roofline                 # 32 rows, context 86, 32 distinct rank-16 adapters
    python -m benchmarks.roofline --peak-gflops 166 --steps 60

Builds the engine's model runner in-process (the model, a KV cache sized for the rows, the adapter
slots and the torch LoRA op, as the engine builds them), prefills --rows prompts of --context
tokens and then times one decode step (every row runs its next token: the forward and a greedy
pick of each row's token) again and again at that context, median of --steps: base rows alone,
and each row with its own adapter (--rows distinct random rank---rank adapters on --targets),
taking turns. Against that it sets

- the compute roofline: the step's FLOPs (2 x in x out per token for every linear layer and the
  vocabulary projection, attention over the context, the LoRA shrink and expand; norms, rotary
  and activations are left out, they are a few % of a FLOP count this small) over the cores'
  fp32 peak (cores x clock x FLOP/cycle, read from /proc/cpuinfo; --peak-gflops overrides);
- the memory roofline: the bytes the step must read (base weights, the rows' K/V, each distinct
  adapter's weights) over this machine's read bandwidth, measured here (a sum over a large tensor).

Then a torch.profiler breakdown of decode steps with adapters: top ops by self CPU time, and the
same split by input shape (which tells the layers' GEMMs from the vocabulary projection and the
LoRA products). Not in CI: it times things. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import make_prompts, model_source, on_own_thread, parse_targets, write_random_adapters
from benchmarks.common import progress as _progress

progress = partial(_progress, "roofline")

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("base", "adapters")
ROUND_STEPS = 5  # timed steps of one mode before the other takes its turn
BANDWIDTH_MB = 512  # the tensor summed to measure read bandwidth: well past the L3 cache


# ---- counting (pure) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-family decoder that its FLOPs and bytes depend on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        """From a transformers config (Llama, Mistral, Qwen2)."""
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   vocab=config.vocab_size)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Projection name -> (in_features, out_features)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def linear_params(shape: Shape) -> int:
    """Weights one token is multiplied with: every layer's seven projections and the vocabulary
    projection (lm_head; tied to the embedding or not, it is read and multiplied once)."""
    per_layer = sum(fan_in * fan_out for fan_in, fan_out in shape.module_shapes().values())
    return shape.layers * per_layer + shape.vocab * shape.hidden


def lora_params(shape: Shape, rank: int, targets: Sequence[str]) -> int:
    """Weights of one rank-`rank` adapter on `targets` in every layer: A [rank, in] and B [out, rank]."""
    modules = shape.module_shapes()
    return shape.layers * rank * sum(sum(modules[m]) for m in targets)


def decode_step_flops(shape: Shape, rows: int, context: int, rank: int = 0,
                      targets: Sequence[str] = ()) -> dict[str, int]:
    """FLOPs of one decode step of `rows` rows, each attending over `context` keys (its own new
    token included), each with its own rank-`rank` adapter on `targets` (rank 0: base only).
    A multiply-add counts 2. Keys: linear, attention, lora, total."""
    linear = 2 * rows * linear_params(shape)
    # per layer and head: q.K^T over the context, then the weights times V: 2 x head_dim x context each
    attention = rows * shape.layers * shape.heads * 4 * shape.head_dim * context
    lora = 2 * rows * lora_params(shape, rank, targets) if rank else 0
    return {"linear": linear, "attention": attention, "lora": lora, "total": linear + attention + lora}


def decode_step_bytes(shape: Shape, rows: int, context: int, rank: int = 0, targets: Sequence[str] = (),
                      adapters: int = 0, itemsize: int = 4) -> dict[str, int]:
    """Bytes one decode step must read at least: the base weights once, each row's K and V over
    its context, and the weights of `adapters` distinct adapters once each. Keys: weights, kv,
    lora, total."""
    weights = linear_params(shape) * itemsize
    kv = rows * context * shape.layers * 2 * shape.kv_heads * shape.head_dim * itemsize
    lora = adapters * lora_params(shape, rank, targets) * itemsize if rank else 0
    return {"weights": weights, "kv": kv, "lora": lora, "total": weights + kv + lora}


def fp32_flops_per_cycle(vendor: str, family: int, flags: AbstractSet[str]) -> int:
    """Peak fp32 FLOP per cycle per core: FMA units x lanes x 2. AMD Zen 2-4 have two 256-bit FMA
    pipes (Zen 4 runs AVX-512 on them in two halves), so 32 with or without avx512f; Zen 5
    (family 26) has 512-bit ones: 64. Intel with avx512f: two 512-bit FMA units on server parts
    (64; some have one: pass --flops-per-cycle 32), with AVX2 and FMA: 32. AVX alone: 16; else 8."""
    if "avx512f" in flags and (vendor != "AuthenticAMD" or family >= 26):
        return 64
    if "avx2" in flags and "fma" in flags:
        return 32
    return 16 if "avx" in flags else 8


def peak_gflops(cores: int, ghz: float, flops_per_cycle: int) -> float:
    """The cores' fp32 peak in GFLOP/s."""
    return cores * ghz * flops_per_cycle


@dataclass(frozen=True)
class Cpu:
    vendor: str
    model: str
    family: int
    flags: frozenset[str]
    mhz: float | None  # the first core's current clock as /proc/cpuinfo says (a VM shows its nominal clock)


def parse_cpuinfo(text: str) -> Cpu:
    """The first processor's entry of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    mhz = fields.get("cpu MHz")
    return Cpu(vendor=fields.get("vendor_id", ""), model=fields.get("model name", ""),
               family=int(fields.get("cpu family", "0") or 0), flags=frozenset(fields.get("flags", "").split()),
               mhz=float(mhz) if mhz else None)


# ---- measuring ------------------------------------------------------------------------------------

def read_bandwidth_gbs(megabytes: int = BANDWIDTH_MB, repeats: int = 5) -> float:
    """GB/s of reading a `megabytes` fp32 tensor once (a sum: one add per 4 bytes, far from the
    compute peak), best of `repeats`."""
    import torch

    x = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        start = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


@dataclass
class Bench:
    """The runner and its rows, prefilled, ready for decode steps at a fixed context."""

    step: Callable[[str], None]  # one decode step of every row of a mode (forward + greedy pick), same context
    shape: Shape
    threads: int


def build(args: argparse.Namespace, root: Path) -> Bench:
    """The engine's model runner with --rows random adapters in its slots, and two sets of --rows
    rows of --context tokens, prefilled but for their last token: "base" rows, and "adapters" rows
    each with its own adapter. On the calling thread (keep it the only torch thread)."""
    import torch

    from engine.adapter import load_peft_adapter
    from engine.config import EngineConfig
    from engine.kv_cache import BlockManager, KVCache
    from engine.lora_op import build_lora_op
    from engine.lora_slots import LoraSlots
    from engine.model_loader import load_model
    from engine.model_runner import ModelRunner
    from engine.request import GenerationRequest
    from engine.sequence import Sequence as Seq

    rows, context, rank, targets = args.rows, args.context, args.rank, parse_targets(args.targets)
    config = EngineConfig(model=args.model, device="cpu", dtype="float32", max_batch=rows,
                          adapter_slots=rows, max_lora_rank=rank)
    progress(f"loading {model_source(args.model)[2]} ...")
    model = load_model(config)
    hf_config = model.hf_model.config
    shape = Shape.from_config(hf_config)
    bs = config.kv_block_size
    per_block = 2 * shape.layers * bs * shape.kv_heads * shape.head_dim * 4
    kv = KVCache(shape.layers, shape.kv_heads, shape.head_dim, bs, per_block * 2 * rows * -(-context // bs),
                 model.device, model.dtype)
    blocks = BlockManager(kv.num_blocks, bs)
    slots = LoraSlots(model.spec, rows, rank, model.device, model.dtype)
    runner = ModelRunner(model, kv, build_lora_op("torch", slots), pack_weights=args.pack_weights, batch_hint=rows)

    names = [f"roofline/a{i:03d}" for i in range(rows)]
    write_random_adapters(root, names, model.spec, rank, targets)
    for slot, name in enumerate(names):
        slots.load(slot, load_peft_adapter(root / name, model.spec, model.dtype, rank, allow_pickle=False))
    progress(f"{rows} random rank-{rank} adapters on {','.join(targets)} in the slots")

    prompts = make_prompts(model.tokenizer, rows, context)
    if any(len(p) != context for p in prompts):
        raise SystemExit(f"--context {context}: the benchmark's text is too short for prompts that long")
    modes: dict[str, list[Seq]] = {}
    for mode in MODES:
        modes[mode] = [Seq(request=GenerationRequest(id=f"{mode}{i}", prompt_token_ids=p), token_ids=list(p),
                           num_prompt_tokens=context, adapter_slot=i if mode == "adapters" else -1)
                       for i, p in enumerate(prompts)]
        for seq in modes[mode]:
            blocks.allocate(seq)
        runner.run(modes[mode], [context - 1] * rows)  # the context but its last token, into the cache
    progress(f"prefilled {rows} rows of {context - 1} tokens per mode")

    def step(mode: str) -> None:
        for seq in modes[mode]:
            seq.num_computed_tokens = context - 1  # the same decode step again: its K/V slot is rewritten
        runner.run(modes[mode]).max(-1).indices.tolist()  # the greedy pick, as engine/sampler.py

    return Bench(step, shape, torch.get_num_threads())


def time_steps(bench: Bench, steps: int) -> dict[str, list[float]]:
    """Seconds of each decode step, base rows and adapter rows taking turns (ROUND_STEPS each),
    `steps` per mode after a few untimed ones."""
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode in MODES:  # first calls, off the clock
        for _ in range(3):
            bench.step(mode)
    while len(times["adapters"]) < steps:
        for mode, out in times.items():
            for _ in range(min(ROUND_STEPS, steps - len(out))):
                start = time.perf_counter()
                bench.step(mode)
                out.append(time.perf_counter() - start)
        progress(f"timed {len(times['adapters'])}/{steps} steps per mode "
                 f"(medians so far: base {statistics.median(times['base']) * 1e3:.1f} ms, "
                 f"adapters {statistics.median(times['adapters']) * 1e3:.1f} ms)")
    return times


def profile(bench: Bench, steps: int, top: int) -> tuple[float, list[dict[str, Any]], list[dict[str, Any]]]:
    """`steps` decode steps with adapters under torch.profiler: the profiled ms per step, the
    `top` ops by self CPU time, and the `top` (op, input shapes) pairs. Each row: name, shapes,
    ms per step, calls per step, GFLOP/s where the profiler counts FLOPs."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            bench.step("adapters")
        wall_ms = (time.perf_counter() - start) * 1e3 / steps

    def rows(by_shape: bool) -> list[dict[str, Any]]:
        events = sorted(prof.key_averages(group_by_input_shape=by_shape), key=lambda e: -e.self_cpu_time_total)
        out = []
        for e in events[:top]:
            seconds = e.self_cpu_time_total / 1e6
            out.append({"op": e.key, "shapes": str(e.input_shapes) if by_shape else "",
                        "ms_per_step": seconds * 1e3 / steps, "calls_per_step": e.count / steps,
                        "gflops": e.flops / seconds / 1e9 if e.flops and seconds else None})
        return out

    return wall_ms, rows(False), rows(True)


# ---- the run --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--rows", type=int, default=32, help="decode rows per step (= distinct adapters)")
    ap.add_argument("--pack-weights", action=argparse.BooleanOptionalAction, default=True,
                    help="GEMMs on oneDNN-packed weights, as the engine runs them on CPU (default: on)")
    ap.add_argument("--context", type=int, default=86,
                    help="keys each row attends over (default: a 70-token prompt halfway through 32 new tokens)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--steps", type=int, default=40, help="timed decode steps per mode (medians)")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=10, help="rows of each profile table")
    ap.add_argument("--ghz", type=float, help="core clock (default: /proc/cpuinfo)")
    ap.add_argument("--flops-per-cycle", type=int, help="fp32 FLOP per cycle per core (default: from the CPU flags)")
    ap.add_argument("--peak-gflops", type=float, help="the cores' fp32 peak, overriding the two above")
    ap.add_argument("--json", dest="json_out", metavar="FILE", help="also write the numbers as JSON to FILE")
    args = ap.parse_args(argv)
    if min(args.rows, args.context, args.rank, args.steps, args.profile_steps) < 1 or args.context < 2:
        ap.error("--rows, --rank, --steps, --profile-steps must be >= 1 and --context >= 2")
    targets = parse_targets(args.targets)
    if unknown := set(targets) - set(MODULES):
        ap.error(f"--targets: unknown modules {sorted(unknown)}")

    cpu = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    ghz = args.ghz or (cpu.mhz / 1e3 if cpu.mhz else None)
    if args.peak_gflops is None and ghz is None:
        ap.error("no clock in /proc/cpuinfo: pass --ghz or --peak-gflops")
    per_cycle = args.flops_per_cycle or fp32_flops_per_cycle(cpu.vendor, cpu.family, cpu.flags)

    def measure() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="loraq-roofline-") as root:
            bench = build(args, Path(root))
            progress("measuring read bandwidth ...")
            bandwidth = read_bandwidth_gbs()
            progress(f"read bandwidth {bandwidth:.1f} GB/s; timing decode steps ...")
            times = time_steps(bench, args.steps)
            progress(f"profiling {args.profile_steps} decode steps with adapters ...")
            profiled = profile(bench, args.profile_steps, args.top)
        return {"bench": bench, "bandwidth": bandwidth, "times": times, "profile": profiled}

    measured = on_own_thread(measure)
    bench: Bench = measured["bench"]
    shape, bandwidth = bench.shape, measured["bandwidth"]
    cores = min(bench.threads, len(os.sched_getaffinity(0)))
    peak = args.peak_gflops or peak_gflops(cores, ghz or 0.0, per_cycle)
    peak_text = (f"--peak-gflops {peak:g}" if args.peak_gflops else
                 f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle")

    n, ctx, rank = args.rows, args.context, args.rank
    numbers: dict[str, Any] = {
        "workload": {"rows": n, "context": ctx, "rank": rank, "targets": list(targets), "model": args.model},
        "cpu": {"model": cpu.model, "threads": bench.threads, "cores": cores, "ghz": ghz,
                "flops_per_cycle": per_cycle, "peak_gflops": peak, "read_gb_s": round(bandwidth, 2)},
        "shape": asdict(shape), "modes": {}}
    print(f"\nroofline of one decode step: {n} rows at context {ctx}, fp32, torch threads {bench.threads}")
    print(f"cpu: {cpu.model}; fp32 peak {peak:.1f} GFLOP/s ({peak_text}); read bandwidth {bandwidth:.1f} GB/s "
          f"(measured)")
    print(f"{'mode':10s} {'step ms':>8s} {'GFLOP':>7s} {'MB read':>8s} {'compute ms':>10s} {'memory ms':>9s} "
          f"{'of peak':>8s} {'step/roof':>9s}")
    for mode, seconds in measured["times"].items():
        on = mode == "adapters"
        flops = decode_step_flops(shape, n, ctx, rank if on else 0, targets)
        moved = decode_step_bytes(shape, n, ctx, rank if on else 0, targets, n if on else 0)
        step_ms = statistics.median(seconds) * 1e3
        compute_ms = flops["total"] / (peak * 1e9) * 1e3
        memory_ms = moved["total"] / (bandwidth * 1e9) * 1e3
        roof_ms = max(compute_ms, memory_ms)
        print(f"{mode:10s} {step_ms:8.1f} {flops['total'] / 1e9:7.2f} {moved['total'] / 1e6:8.0f} {compute_ms:10.1f} "
              f"{memory_ms:9.1f} {compute_ms / step_ms:8.0%} {step_ms / roof_ms:8.2f}x")
        numbers["modes"][mode] = {"step_ms_median": round(step_ms, 2), "step_ms_min": round(min(seconds) * 1e3, 2),
                                  "steps": len(seconds), "flops": flops, "bytes": moved,
                                  "compute_roof_ms": round(compute_ms, 2), "memory_roof_ms": round(memory_ms, 2),
                                  "fraction_of_peak": round(compute_ms / step_ms, 3)}
    flops = decode_step_flops(shape, n, ctx, rank, targets)
    print(f"FLOPs with adapters: linear {flops['linear'] / 1e9:.2f} G (vocabulary "
          f"{2 * n * shape.vocab * shape.hidden / 1e9:.2f} G), attention {flops['attention'] / 1e9:.3f} G, "
          f"LoRA {flops['lora'] / 1e9:.3f} G; 'of peak' = compute roofline / step")

    wall_ms, by_op, by_shape = measured["profile"]
    numbers["profile"] = {"profiled_ms_per_step": round(wall_ms, 2), "by_op": by_op, "by_op_and_shape": by_shape}
    for title, table in (("op", by_op), ("op and input shapes", by_shape)):
        print(f"\nprofile, decode step with adapters ({wall_ms:.1f} ms per step under the profiler), "
              f"top {len(table)} by self CPU time, by {title}:")
        print(f"  {'ms/step':>8s} {'share':>6s} {'calls':>6s} {'GFLOP/s':>8s}  op")
        for row in table:
            rate = f"{row['gflops']:8.1f}" if row["gflops"] is not None else f"{'':8s}"
            shapes = f" {row['shapes']}" if row["shapes"] else ""
            print(f"  {row['ms_per_step']:8.2f} {row['ms_per_step'] / wall_ms:6.1%} {row['calls_per_step']:6.0f} "
                  f"{rate}  {row['op']}{shapes}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
