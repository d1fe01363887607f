"""GPU acceptance run (issue 15): one prepared check for the day a GPU machine is at hand.

    bash scripts/gpu_check.sh [--out DIR]      # a bare GPU machine, under 8 minutes
    bash scripts/gpu_check.sh --dry-run        # CPU, tiny shapes, Triton's interpreter: proves it runs

Writes DIR/gpu_check.md and DIR/gpu_check.json (DIR: --out, else $OUT, else ./gpu_check_out),
rewritten after every section, so a run cut short still leaves what it measured. Sections (a
failing one is recorded with its error and the run goes on):

- env: versions, the device, missing packages.
- tests: pytest on the LoRA op tests: on CUDA the Triton reference grid runs compiled, and the
  `cuda`-marked tests run.
- peft: greedy tokens of the engine against PEFT alone, in bf16, on tiny random Llama / Mistral /
  Qwen2 models (tests/builders.py) with adapters of ranks 1-32, for each LoRA backend.
- op: Punica's ratio, the LoRA op's time (shrink + expand) over one dense projection of the same
  shape, Llama-3-8B projections, rank-16 adapters, distinct or one shared by every row.
- decode: a decode step of a Llama-3-8B-shaped model with random weights (nothing downloaded), 32
  rows each with its own rank-16 q/k/v/o adapter against the same rows on the base model alone
  (issue 15's goal: <= 1.1x), for each backend.
- load: an adapter's host -> device copy into its slot (LoraSlots.load), time and bandwidth,
  from pinned and from pageable memory.

Needs torch, transformers, peft, safetensors, pytest, and triton on CUDA; no broker, no network.
Times are per call over back-to-back calls, host launch overhead included, the device synchronised
at the end. The engine logs through structlog: where it is not installed (a bare CUDA image) a
silent stand-in is put on the path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "tests", "peft", "op", "decode", "load")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PEFT_ADAPTERS = {  # name -> tests.builders.make_adapter kwargs
    "qv_r8": dict(r=8, alpha=16, targets=("q_proj", "v_proj")),
    "all_r4": dict(r=4, alpha=8, targets=ATTN + MLP),
    "attn_r16_rslora": dict(r=16, alpha=32, targets=ATTN, use_rslora=True),
    "mlp_r2": dict(r=2, alpha=4, targets=MLP),
    "o_r1": dict(r=1, alpha=2, targets=("o_proj",)),
    "all_r32": dict(r=32, alpha=16, targets=ATTN + MLP),
}
STANDIN_STRUCTLOG = '''"""Silent stand-in for structlog (gpu_check on an image without it): the engine only logs."""
class _Quiet:
    def bind(self, **_kw):
        return self

    def __getattr__(self, _name):
        return lambda *_a, **_kw: None


def get_logger(*_a, **_kw):
    return _Quiet()
'''


@dataclass(frozen=True)
class Shape:
    """A Llama-family decoder's sizes."""

    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """module -> (in, out)."""
        kv = self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, self.hidden), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (self.hidden, self.hidden), "gate_proj": (self.hidden, self.inter),
                "up_proj": (self.hidden, self.inter), "down_proj": (self.inter, self.hidden)}


LLAMA3_8B = Shape(layers=32, hidden=4096, inter=14336, heads=32, kv_heads=8, vocab=128256)
TINY = Shape(layers=2, hidden=64, inter=128, heads=4, kv_heads=2, vocab=300)


@dataclass
class Check:
    """What one run measures at: the real sizes on a GPU, tiny ones in the dry run."""

    dry: bool
    out: Path
    device: Any  # torch.device
    backends: tuple[str, ...]
    shape: Shape
    archs: tuple[str, ...]
    new_tokens: int
    batch_sizes: tuple[int, ...]  # decode rows for the op ratio
    prefill_tokens: int
    decode_rows: int
    context: int  # tokens per row before the timed decode steps
    reps: int  # timed calls per measurement
    warmup: int  # untimed calls before them
    rounds: int  # decode: measurements of base and adapters, taking turns


# ---- helpers --------------------------------------------------------------------------------------

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_ms(fn: Callable[[], object], device, reps: int, warmup: int) -> float:
    """Milliseconds per call of fn over `reps` back-to-back calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps * 1e3


def random_adapter(spec, rank: int, modules: tuple[str, ...], seed: int, dtype, std: float = 0.02):
    """An AdapterWeights with random A [in, r] and B [r, out] for every layer of `spec`."""
    import torch

    from engine.adapter import AdapterWeights

    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(spec.num_layers):
        for m in modules:
            fan_in, fan_out = spec.module_shapes[m]
            weights[(layer, m)] = ((torch.randn(fan_in, rank, generator=g) / fan_in**0.5).to(dtype),
                                   (torch.randn(rank, fan_out, generator=g) * std).to(dtype))
    return AdapterWeights.from_modules(f"random{seed}", weights)


def model_spec(shape: Shape, name: str):
    from engine.model_loader import ModelSpec

    return ModelSpec("llama", shape.layers, shape.hidden, shape.module_shapes(), name)


def random_llama(shape: Shape, device, dtype):
    """A LoadedModel of `shape` with random weights, built on the device (nothing downloaded)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.model_loader import LoadedModel

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.inter,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=False)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.eval().requires_grad_(False)
    return LoadedModel(hf_model=hf, tokenizer=None, spec=model_spec(shape, "random Llama"), device=device,
                       dtype=dtype, eos_token_ids=frozenset(), max_model_len=8192)


# ---- sections -------------------------------------------------------------------------------------

def section_env(check: Check) -> dict:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "device": str(check.device), "dry_run": check.dry,
                            "backends": list(check.backends)}
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    for package in ("triton", "transformers", "peft", "safetensors", "pytest", "structlog"):
        spec = importlib.util.find_spec(package)
        info[package] = _version(package) if spec is not None else "missing"
    return info


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "installed"


def section_tests(check: Check) -> dict:
    """pytest in a child process: the whole LoRA op test files (on CUDA the Triton grid compiled)."""
    files = ["tests/engine/test_lora_op.py", "tests/engine/test_lora_triton.py"]
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    if check.dry:
        args += ["-m", "cuda"]  # all skipped on CPU: proves collection and the command
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    result = {"command": " ".join(args[2:]), "returncode": proc.returncode, "summary": summary}
    if proc.returncode not in (0, 5):  # 5: nothing collected (the dry run may deselect all)
        result["output_tail"] = (proc.stdout + proc.stderr)[-4000:]
        raise CheckFailed(result)
    return result


def section_peft(check: Check) -> dict:
    """Greedy tokens of the engine in bf16 (every adapter and base rows in one batch) against PEFT
    running each adapter alone in bf16, and both against PEFT in fp32."""
    import torch

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.request import AdapterRef, Completion, GenerationRequest, SamplingParams
    from tests.builders import make_adapter, make_tiny_model, run_requests

    adapters = dict(list(PEFT_ADAPTERS.items())[:2]) if check.dry else PEFT_ADAPTERS
    rows: list[tuple[str | None, list[int]]] = []
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate([*adapters, None, *adapters, None]):
        rows.append((name, torch.randint(3, 259, (5 + 4 * i,), generator=g).tolist()))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in check.archs:
            model_dir = make_tiny_model(Path(tmp) / arch, arch)
            root = Path(tmp) / f"adapters_{arch}"
            for seed, (name, kw) in enumerate(adapters.items()):
                make_adapter(model_dir, root / name, seed=seed + 10, scale=0.15, **kw)
            greedy = {}
            for dtype in (torch.bfloat16, torch.float32):
                peft = _peft(model_dir, root, list(adapters), dtype, check.device)
                greedy[dtype] = [_peft_greedy(peft, adapter, ids, check.new_tokens, check.device)
                                 for adapter, ids in rows]
            expected, exact = greedy[torch.bfloat16], greedy[torch.float32]
            # how far bf16 alone moves greedy tokens on these models: the noise floor of the comparison
            results[f"{arch}/peft bf16 vs peft fp32"] = _agreement(expected, exact)
            for backend in check.backends:
                config = EngineConfig(model=str(model_dir), device=str(check.device), dtype="bfloat16",
                                      lora_backend=backend, adapter_root=str(root), adapter_slots=8,
                                      max_lora_rank=32, kv_cache_bytes=64 << 20)
                engine = Engine(config)
                try:
                    requests = [GenerationRequest(id=str(i), prompt_token_ids=ids,
                                                  params=SamplingParams(max_new_tokens=check.new_tokens),
                                                  adapter=AdapterRef(adapter) if adapter else None)
                                for i, (adapter, ids) in enumerate(rows)]
                    outcomes = run_requests(engine, requests, timeout=300)
                finally:
                    engine.shutdown(30)
                got = [list(o.token_ids) if isinstance(o, Completion) else []
                       for o in (outcomes[str(i)] for i in range(len(rows)))]
                results[f"{arch}/loraq {backend} vs peft bf16"] = _agreement(got, expected)
                results[f"{arch}/loraq {backend} vs peft fp32"] = _agreement(got, exact)
    return {"new_tokens": check.new_tokens, "adapters": list(adapters), "rows_per_model": len(rows),
            "rows": [{"pair": pair, **r} for pair, r in results.items()]}


def _peft(model_dir: Path, root: Path, names: list[str], dtype, device):
    """A PeftModel on the base in `dtype`, every adapter loaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    peft = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(root / name, adapter_name=name)
    return peft.eval()


def _agreement(got: list[list[int]], expected: list[list[int]]) -> dict:
    """Rows whose greedy tokens are all equal, and tokens equal before each row's first difference."""
    same = sum(a == b for a, b in zip(got, expected, strict=True))
    prefix = sum(_common_prefix(a, b) for a, b in zip(got, expected, strict=True))
    return {"rows_identical": f"{same}/{len(expected)}",
            "tokens_before_first_difference": f"{prefix}/{sum(len(b) for b in expected)}"}


def _peft_greedy(peft, adapter: str | None, ids: list[int], new: int, device) -> list[int]:
    import torch

    kw = dict(input_ids=torch.tensor([ids], device=device),
              attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
              max_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if adapter is None:
            with peft.disable_adapter():
                out = peft.generate(**kw)
        else:
            peft.set_adapter(adapter)
            out = peft.generate(**kw)
    return out[0, len(ids):].tolist()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def section_op(check: Check) -> dict:
    """LoRA op / dense projection, per backend, module shape and batch layout (rank 16)."""
    import torch
    import torch.nn.functional as F

    from engine.lora_op import build_lora_op
    from engine.lora_slots import LoraSlots

    dtype = torch.bfloat16 if check.device.type == "cuda" else torch.float32
    shape = check.shape
    spec = model_spec(shape, "op")
    spec = type(spec)(spec.arch, 1, spec.hidden_size, spec.module_shapes, spec.base_model_name)  # one layer
    n_slots = max(check.batch_sizes)
    slots = LoraSlots(spec, n_slots, 16, check.device, dtype)
    for s in range(n_slots):
        slots.load(s, random_adapter(spec, 16, ("q_proj", "down_proj"), seed=s, dtype=dtype))
    layouts = {}
    for b in check.batch_sizes:
        layouts[f"decode {b} distinct"] = ([1] * b, list(range(b)))
        layouts[f"decode {b} identical"] = ([b], [0])
    layouts[f"prefill {check.prefill_tokens} tokens, 1 adapter"] = ([check.prefill_tokens], [0])
    rows = []
    for module in ("q_proj", "down_proj"):
        fan_in, fan_out = spec.module_shapes[module]
        weight = torch.randn(fan_out, fan_in, device=check.device, dtype=dtype) * 0.02
        for name, (seg_lens, seg_slots) in layouts.items():
            tokens = sum(seg_lens)
            xs = [torch.randn(tokens, fan_in, device=check.device, dtype=dtype) for _ in range(2)]
            y = torch.zeros(tokens, fan_out, device=check.device, dtype=dtype)
            dense = per_call_ms(lambda x=xs[0], w=weight: F.linear(x, w), check.device, check.reps, check.warmup)
            row = {"module": module, "layout": name, "dense_ms": round(dense, 4)}
            for backend in check.backends:
                op = build_lora_op(backend, slots)
                batch = op.prepare(seg_lens, seg_slots)
                turn = iter(range(10**9))

                def call(op=op, batch=batch, y=y, xs=xs, turn=turn, module=module) -> None:
                    # alternate x: no call reuses the previous shrink
                    op.apply(y, xs[next(turn) % 2], 0, module, batch)

                ms = per_call_ms(call, check.device, check.reps, check.warmup)
                row[f"{backend}_ms"] = round(ms, 4)
                row[f"{backend}_ratio"] = round(ms / dense, 3)
            rows.append(row)
    return {"dtype": str(dtype), "rank": 16, "shape": asdict(shape), "rows": rows}


def section_decode(check: Check) -> dict:
    """Decode-step time, each row with its own rank-16 q/k/v/o adapter vs base only."""
    import torch

    from engine.kv_cache import BlockManager, KVCache
    from engine.lora_op import build_lora_op
    from engine.lora_slots import LoraSlots
    from engine.model_runner import ModelRunner
    from engine.request import GenerationRequest
    from engine.sequence import Sequence

    dtype = torch.bfloat16 if check.device.type == "cuda" else torch.float32
    shape, rows = check.shape, check.decode_rows
    start = time.perf_counter()
    model = random_llama(shape, check.device, dtype)
    build_s = time.perf_counter() - start
    slots = LoraSlots(model.spec, rows, 16, check.device, dtype)
    for s in range(rows):
        slots.load(s, random_adapter(model.spec, 16, ATTN, seed=s, dtype=dtype))
    block = 16
    kv_bytes = 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype.itemsize * (check.context + block) * rows
    cache = KVCache(shape.layers, shape.kv_heads, shape.head_dim, block, kv_bytes, check.device, dtype)
    blocks = BlockManager(cache.num_blocks, block)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(rows):
        ids = torch.randint(0, shape.vocab, (check.context,), generator=g).tolist()
        seq = Sequence(GenerationRequest(id=str(i), prompt_token_ids=ids), list(ids), len(ids))
        blocks.allocate(seq)
        seqs.append(seq)
    result: dict[str, Any] = {"shape": asdict(shape), "dtype": str(dtype), "rows": rows, "context": check.context,
                              "adapters": f"{rows} distinct, rank 16, q/k/v/o", "model_build_s": round(build_s, 1)}
    for backend in check.backends:
        runner = ModelRunner(model, cache, build_lora_op(backend, slots))
        for seq in seqs:
            seq.adapter_slot = -1
            seq.num_computed_tokens = 0
        runner.run(seqs, [seq.num_tokens - 1 for seq in seqs])  # fills the KV cache of every row but its newest token
        times: dict[str, list[float]] = {"base": [], "lora": []}

        def step(r=runner) -> None:  # the same decode step again: its newest token, over the whole context
            for seq in seqs:
                seq.num_computed_tokens = seq.num_tokens - 1
            r.run(seqs)

        for _ in range(check.rounds):
            for kind in ("base", "lora"):
                for i, seq in enumerate(seqs):
                    seq.adapter_slot = -1 if kind == "base" else i
                times[kind].append(per_call_ms(step, check.device, check.reps, check.warmup))
        base, lora = statistics.median(times["base"]), statistics.median(times["lora"])
        result[backend] = {"base_ms": round(base, 3), "lora_ms": round(lora, 3), "ratio": round(lora / base, 3),
                           "goal": "<= 1.1"}
    del model
    return result


def section_load(check: Check) -> dict:
    """LoraSlots.load of one rank-16 q/k/v/o adapter (and an all-linear one), pinned and pageable."""
    import torch

    from engine.lora_slots import LoraSlots

    dtype = torch.bfloat16 if check.device.type == "cuda" else torch.float32
    spec = model_spec(check.shape, "load")
    result: dict[str, Any] = {"shape": asdict(check.shape), "dtype": str(dtype)}
    for modules, label in ((ATTN, "rank 16, q/k/v/o"), (ATTN + MLP, "rank 16, all linear")):
        slots = LoraSlots(spec, 2, 64, check.device, dtype)
        w = random_adapter(spec, 16, modules, seed=1, dtype=dtype)
        sources = {"pageable": w}
        if check.device.type == "cuda":
            sources["pinned"] = w.pin_memory()
        for kind, source in sources.items():
            turn = iter(range(10**9))
            ms = per_call_ms(lambda s=source, t=turn, slots=slots: slots.load(next(t) % 2, s), check.device,
                             check.reps, check.warmup)
            result[f"{label}, {kind}"] = {"MB": round(w.nbytes / 1e6, 2), "ms": round(ms, 3),
                                          "GB_per_s": round(w.nbytes / ms / 1e6, 2)}
    return result


SECTION_FNS: dict[str, Callable[[Check], dict]] = {
    "env": section_env, "tests": section_tests, "peft": section_peft, "op": section_op,
    "decode": section_decode, "load": section_load,
}


class CheckFailed(Exception):
    """A section ran but its result fails (the result is still reported)."""

    def __init__(self, result: dict) -> None:
        super().__init__("check failed")
        self.result = result


# ---- report ---------------------------------------------------------------------------------------

def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# loraq GPU check ({'dry run, CPU' if report['dry_run'] else 'GPU'})", "",
             f"{report['started']}, {report['elapsed_s']} s", ""]
    for name, section in report["sections"].items():
        lines += [f"## {name}: {section['status']} ({section['seconds']} s)", ""]
        body = section.get("result") or {}
        table = body.get("rows") if isinstance(body.get("rows"), list) else None
        for key, value in body.items():
            if key != "rows" or table is None:
                lines.append(f"- {key}: {json.dumps(value, default=str) if isinstance(value, dict | list) else value}")
        if table:
            keys = list(dict.fromkeys(k for row in table for k in row))
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in table]
        if "error" in section:
            lines += ["", "```", section["error"], "```"]
        lines.append("")
    (out / "gpu_check.md").write_text("\n".join(lines))


def make_check(dry: bool, out: Path) -> Check:
    import torch

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    triton = importlib.util.find_spec("triton") is not None
    backends = ("torch", "triton") if triton else ("torch",)
    if cuda:
        return Check(dry=False, out=out, device=device, backends=backends, shape=LLAMA3_8B,
                     archs=("llama", "mistral", "qwen2"), new_tokens=16, batch_sizes=(1, 8, 32, 64),
                     prefill_tokens=1024, decode_rows=32, context=512, reps=20, warmup=3, rounds=3)
    return Check(dry=True, out=out, device=device, backends=backends, shape=TINY, archs=("llama",),
                 new_tokens=3, batch_sizes=(4,), prefill_tokens=20, decode_rows=4, context=8, reps=2, warmup=1,
                 rounds=1)


def prepare_environment(dry: bool) -> None:
    """Before any engine import: the interpreter for Triton on CPU, structlog's stand-in if missing."""
    import torch

    if dry or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    if importlib.util.find_spec("structlog") is None:
        standins = Path(tempfile.mkdtemp(prefix="gpu_check_standins_"))
        (standins / "structlog.py").write_text(STANDIN_STRUCTLOG)
        sys.path.insert(0, str(standins))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(standins), os.environ.get("PYTHONPATH")]))
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (proves the script runs)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="report directory")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    prepare_environment(args.dry_run)
    check = make_check(args.dry_run, Path(args.out))
    started = time.perf_counter()
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": check.dry,
                              "elapsed_s": 0, "sections": {}}
    failed = False
    for name in wanted:
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        t0 = time.perf_counter()
        entry: dict[str, Any]
        try:
            entry = {"status": "ok", "result": SECTION_FNS[name](check)}
        except CheckFailed as e:
            entry, failed = {"status": "failed", "result": e.result}, True
        except Exception:
            entry, failed = {"status": "error", "error": traceback.format_exc()[-4000:]}, True
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = entry
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_report(check.out, report)
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {name}: {entry['status']} in {entry['seconds']} s",
              flush=True)
    print(f"report: {check.out / 'gpu_check.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
