"""Adapter load speed (issue 12, point 2): loading an adapter from a local directory whose files are
in the page cache, against a plain read of the same files.

    python -m benchmarks.adapter_load                     # SmolLM2-135M shapes, 100 rank-8 q/k/v/o adapters
    python -m benchmarks.adapter_load --adapters 3 --model path/to/tiny-model --rounds 1

Per adapter, on one thread with one torch thread (as the store's loader threads run):
    read   the bytes of its files (`Path.read_bytes`): the floor any loader pays
    load   `load_peft_adapter`: read + validate, the op's layout as views (engine/adapter.py)
    slot   `LoraSlots.load`: the copy into a device slot (engine/lora_slots.py; on the engine thread)
Every adapter is read once before timing, so its files are in the page cache; each round times
read, then load + slot, adapter by adapter, so background load hits both alike. Prints MB/s (file
bytes over time) of each, best and median over all adapters and rounds, and the ratios, twice:
    reused  each result dropped before the next: its memory is reused, as by a load whose adapter
            the host tier then evicts
    fresh   every result of a round kept, as the host tier keeps adapters: each read and load
            fills memory the process never touched, and pays its page faults (the same for both)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import model_spec, on_own_thread, parse_targets, progress, write_random_adapters

say = partial(progress, "adapter-load")
MEMORY = {"reused": False, "fresh": True}  # whether a round keeps every result it makes


def measure(root: Path, names: list[str], spec: Any, device: str, dtype: str, max_rank: int,
            rounds: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per adapter and round, memory reused and fresh: {"reused": {"read": [...], "load": [...],
    "slot": [...]}, "fresh": {...}}."""
    import torch

    from engine.adapter import load_peft_adapter
    from engine.lora_slots import LoraSlots

    torch.set_num_threads(1)
    torch_dtype = getattr(torch, dtype)
    slots = LoraSlots(spec, 32, max_rank, device, torch_dtype)

    def read(path: Path) -> list[bytes]:
        return [f.read_bytes() for f in path.iterdir() if f.is_file()]

    for name in names:  # into the page cache, and the first-call costs, off the clock
        read(root / name)
    slots.load(0, load_peft_adapter(root / names[0], spec, torch_dtype, max_rank, False))
    times: dict[str, dict[str, list[float]]] = {memory: {"read": [], "load": [], "slot": []}
                                                 for memory in MEMORY}
    for r in range(rounds):
        for memory, kept in MEMORY.items():
            held: list[Any] = []
            for i, name in enumerate(names):
                t0 = time.perf_counter()
                data = read(root / name)
                t1 = time.perf_counter()
                w = load_peft_adapter(root / name, spec, torch_dtype, max_rank, False)
                t2 = time.perf_counter()
                slots.load(i % slots.num_slots, w)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t3 = time.perf_counter()
                for step, seconds in (("read", t1 - t0), ("load", t2 - t1), ("slot", t3 - t2)):
                    times[memory][step].append(seconds)
                if kept:
                    held += [data, w]
            say(f"round {r + 1}/{rounds}, memory {memory}: {len(names)} adapters")
    return times


def report(times: dict[str, list[float]], nbytes: int) -> tuple[str, dict[str, Any]]:
    """One memory kind's printed table and JSON numbers (MB/s: file bytes over seconds)."""
    mb = nbytes / 1e6
    both = [a + b for a, b in zip(times["load"], times["slot"], strict=True)]
    rows = {"read": times["read"], "load": times["load"], "slot": times["slot"], "load + slot": both}
    numbers: dict[str, Any] = {}
    lines = [f"{'step':12s} {'best ms':>8s} {'best MB/s':>10s} {'median ms':>10s} {'median MB/s':>12s}"]
    for step, values in rows.items():
        best, median = min(values), statistics.median(values)
        numbers[step.replace(" + ", "_")] = {"best_ms": round(best * 1e3, 3), "median_ms": round(median * 1e3, 3),
                                             "best_mb_s": round(mb / best), "median_mb_s": round(mb / median)}
        lines.append(f"{step:12s} {best * 1e3:8.2f} {mb / best:10.0f} {median * 1e3:10.2f} {mb / median:12.0f}")
    read_med = statistics.median(times["read"])
    for step, values in (("load", times["load"]), ("load + slot", both)):
        name = step.replace(" + ", "_")
        numbers[f"ratio_{name}_vs_read_median"] = round(read_med / statistics.median(values), 3)
        numbers[f"ratio_{name}_vs_read_best"] = round(min(times["read"]) / min(values), 3)
        lines.append(f"{step} MB/s / read MB/s: median {numbers[f'ratio_{name}_vs_read_median']:.3f}, "
                     f"best {numbers[f'ratio_{name}_vs_read_best']:.3f}")
    return "\n".join(lines), numbers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.adapter_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="whose shapes the adapters have (its config is read)")
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--device", default="cpu", help="where the slots live (cpu, cuda)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-rank", type=int, default=64, help="the slots' max rank (the worker's --max-lora-rank)")
    ap.add_argument("--json", dest="json_out", metavar="FILE", help="also write the numbers as JSON to FILE")
    args = ap.parse_args(argv)
    say(f"reading the config of {args.model} ...")
    spec = model_spec(args.model)
    root = Path(tempfile.mkdtemp(prefix="loraq-bench-load-"))
    try:
        names = [f"a{i:04d}" for i in range(args.adapters)]
        say(f"writing {args.adapters} random rank-{args.rank} adapters on {args.targets} ...")
        write_random_adapters(root, names, spec, args.rank, parse_targets(args.targets))
        nbytes = sum(f.stat().st_size for f in (root / names[0]).iterdir())
        say(f"timing {args.rounds} rounds of {args.adapters} adapters of {nbytes / 1e6:.2f} MB ...")
        times = on_own_thread(lambda: measure(root, names, spec, args.device, args.dtype, args.max_rank,
                                              args.rounds))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    numbers: dict[str, Any] = {"adapter_mb": round(nbytes / 1e6, 3)}
    print(f"\nadapter load: {spec.base_model_name}, rank {args.rank} on {args.targets}, "
          f"{nbytes / 1e6:.2f} MB per adapter, slots on {args.device} in {args.dtype}, one torch thread")
    for memory, kept in MEMORY.items():
        table, numbers[memory] = report(times[memory], nbytes)
        print(f"\nmemory {memory} ({'every result kept' if kept else 'each result dropped'}):\n{table}")
    numbers["workload"] = {k: v for k, v in vars(args).items() if k != "json_out"}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
