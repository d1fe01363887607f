"""What the benchmarks share: progress lines, prompts, random PEFT adapters, percentiles, and the
thread that keeps each system's torch work apart.

Torch runs only on threads that end with their work (`on_own_thread`) or on the engine's own
thread, never on a benchmark's main thread: why is in the README, "CPU threads".
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.model_loader import ModelSpec
    from engine.request import Completion, GenerationRequest

T = TypeVar("T")

SEED_TEXT = (
    "The quarterly report covers revenue, churn and support tickets for every region. "
    "Customers asked about invoices, password resets, delivery delays and refunds. "
    "Summarise the main issues, list the three most urgent actions, and suggest a reply "
    "template that a support agent could send to an unhappy customer today. "
)
MLP_MODULES = frozenset({"gate_proj", "up_proj", "down_proj"})


def progress(bench: str, message: str) -> None:
    """One timestamped line on stdout, at once: `[bench engine 12:00:00] message`."""
    print(f"[bench {bench} {time.strftime('%H:%M:%S')}] {message}", flush=True)


def on_own_thread(fn: Callable[[], T]) -> T:
    """fn() on a new thread that ends with it (its OpenMP pool ends too: README, "CPU threads")."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def run_all(engine: Engine, requests: Sequence[GenerationRequest]) -> tuple[float, list[Completion]]:
    """Submit every request at once (one group); wall seconds until the last finishes, and the
    completions in request order. Raises if any request failed."""
    from engine.request import Completion, Outcome

    done = threading.Event()
    results: dict[str, Outcome] = {}
    lock = threading.Lock()

    def on_finish(outcome: Outcome) -> None:
        with lock:
            results[outcome.request_id] = outcome
            if len(results) == len(requests):
                done.set()

    start = time.perf_counter()
    engine.submit_many([(r, None, on_finish) for r in requests])
    done.wait()
    elapsed = time.perf_counter() - start
    ordered = [results[r.id] for r in requests]
    failed = [o for o in ordered if not isinstance(o, Completion)]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]}")
    return elapsed, [o for o in ordered if isinstance(o, Completion)]


def make_prompts(tokenizer: Any, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` token ids (rotated views of one long text)."""
    ids = tokenizer(SEED_TEXT * 8, add_special_tokens=False)["input_ids"]
    return [ids[(7 * i) % 200:(7 * i) % 200 + length] for i in range(n)]


def write_random_adapter(out_dir: Path, spec: ModelSpec, rank: int, targets: Sequence[str],
                         seed: int) -> None:
    """A PEFT LoRA adapter for `spec`'s model with random weights, small enough to keep text sane:
    A[r, fan_in] ~ N(0, 1/fan_in), B[fan_out, r] ~ N(0, 0.02^2), lora_alpha = 2r."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for module in targets:
            fan_in, fan_out = spec.module_shapes[module]
            part = "mlp" if module in MLP_MODULES else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.02
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
              "base_model_name_or_path": spec.base_model_name, "use_rslora": False, "use_dora": False}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))


def write_random_adapters(root: Path, names: Sequence[str], spec: ModelSpec, rank: int,
                          targets: Sequence[str]) -> None:
    """`write_random_adapter` for each name under `root` (seed: its index), on a thread of its own.
    The files are then flushed to disk (they stay in the page cache): the kernel's writeback of
    gigabytes of fresh files would otherwise run during, and slow, the measurement that follows."""
    def write_all() -> None:
        for seed, name in enumerate(names):
            write_random_adapter(root / name, spec, rank, targets, seed)
        os.sync()

    on_own_thread(write_all)


def model_source(model: str) -> tuple[str, dict[str, str], str]:
    """(what from_pretrained gets, its kwargs, a display name) for `model` as --model names it:
    'embedded', a local dir, a .gguf file or a hub id."""
    from engine.config import EMBEDDED_MODEL
    from engine.model_loader import embedded_model_path

    if model == EMBEDDED_MODEL:
        directory, gguf_file = embedded_model_path()
        return directory, {"gguf_file": gguf_file}, "SmolLM2-135M-Instruct (embedded)"
    if model.endswith(".gguf") and Path(model).is_file():
        return str(Path(model).parent), {"gguf_file": Path(model).name}, model
    return model, {}, model


def model_spec(model: str) -> ModelSpec:
    """`model`'s ModelSpec from its config alone (no weights): what writing adapters for a worker
    that loads the model itself needs. Llama-family projection shapes."""
    from transformers import AutoConfig

    from engine.model_loader import ModelSpec

    source, kwargs, name = model_source(model)
    config = AutoConfig.from_pretrained(source, **kwargs)
    hidden, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return ModelSpec(config.model_type, config.num_hidden_layers, hidden, shapes, name)


def model_tokenizer(model: str) -> Any:
    """`model`'s tokenizer (for prompts of a known length)."""
    from transformers import AutoTokenizer

    source, kwargs, _ = model_source(model)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100), linear between closest ranks (numpy's default); nan
    for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p99 and mean of `values`."""
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": statistics.fmean(values) if values else math.nan}


def parse_targets(text: str) -> tuple[str, ...]:
    """`q_proj, v_proj` -> ("q_proj", "v_proj")."""
    return tuple(t.strip() for t in text.split(",") if t.strip())
