"""Structured output benchmark (issue 13): what grammar-constrained rows cost a step.

    python -m benchmarks.structured         # or: loraq bench structured

The same N requests (one random adapter each unless --rank 0) run three ways, taking turns
--repeats times: (a) every row free, (b) every other row constrained by a JSON schema, (c) every
row constrained. Constrained rows follow a schema they cannot finish within --new-tokens (an array
of at least 10000 game characters: objects, enums, bounded strings and integers), and free rows
ignore EOS, so all three do the same steps. Prints the median step time of each and the ratios,
then where the grammar's time goes, per step with constrained rows: the masks filled on the
grammar thread (during the forward pass), the step thread's wait for them once the forward is
done, and their unpacking into a [B, V] logit bias; then a schema's compile time, cold and cached.
Last, a validity pass: N requests with the character schema itself and --valid-tokens new tokens
(greedy, and sampled at temperature 1), each text parsed and validated against the schema.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import torch

from benchmarks.common import make_prompts, parse_targets, run_all, write_random_adapters
from benchmarks.common import progress as _progress
from engine.config import EngineConfig
from engine.engine import Engine
from engine.grammar import Grammar
from engine.request import AdapterRef, Completion, GenerationRequest, ResponseFormat, SamplingParams

progress = partial(_progress, "structured")

CHARACTER = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 1, "maximum": 99},
        "armor": {"$ref": "#/$defs/Armor"},
        "strength": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["name", "age", "armor", "strength"],
    "additionalProperties": False,
}
ARMOR = {"enum": ["leather", "chainmail", "plate"], "type": "string"}
CHARACTER_SCHEMA = {"$defs": {"Armor": ARMOR}, **CHARACTER}
ROSTER_SCHEMA = {"$defs": {"Armor": ARMOR, "Character": CHARACTER}, "type": "array",
                 "items": {"$ref": "#/$defs/Character"}, "minItems": 10000}
SYSTEMS = {"a_free": 0.0, "b_half_constrained": 0.5, "c_all_constrained": 1.0}  # share of constrained rows


class GrammarClock:
    """Times the engine's grammar work by wrapping its Grammar's methods (this benchmark only):
    fill (grammar thread), the step thread's wait for the masks, and their unpacking."""

    def __init__(self, grammar: Grammar) -> None:
        self.fill_s: list[float] = []
        self.wait_s: list[float] = []
        self.unpack_s: list[float] = []
        fill, fill_rows, bias = grammar.fill, grammar._fill, grammar.bias

        def timed_fill_rows(rows: Any, bitmask: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = fill_rows(rows, bitmask)
            self.fill_s.append(time.perf_counter() - start)
            return out

        def timed_fill(matchers: Any) -> Future[torch.Tensor] | None:
            future = fill(matchers)
            return None if future is None else _TimedFuture(future, self.wait_s)

        def timed_bias(bitmask: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = bias(bitmask)
            self.unpack_s.append(time.perf_counter() - start)
            return out

        grammar._fill = timed_fill_rows  # type: ignore[method-assign]
        grammar.fill = timed_fill  # type: ignore[method-assign]
        grammar.bias = timed_bias  # type: ignore[method-assign]

    def take(self) -> dict[str, float]:
        """Median ms per step with constrained rows since the last take (0 when there were none)."""
        out = {name: 1000 * statistics.median(xs) if xs else 0.0 for name, xs in
               (("fill_ms", self.fill_s), ("wait_ms", self.wait_s), ("unpack_ms", self.unpack_s))}
        for xs in (self.fill_s, self.wait_s, self.unpack_s):
            xs.clear()
        return out


class _TimedFuture(Future):
    def __init__(self, inner: Future[torch.Tensor], waits: list[float]) -> None:
        super().__init__()
        self._inner, self._waits = inner, waits

    def result(self, timeout: float | None = None) -> torch.Tensor:
        start = time.perf_counter()
        out = self._inner.result(timeout)
        self._waits.append(time.perf_counter() - start)
        return out


def run(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, int, list[Completion]]:
    """Submit all at once: (wall seconds until the last finishes, engine steps, completions)."""
    steps = engine.stats()["steps"]
    elapsed, completions = run_all(engine, requests)
    return elapsed, engine.stats()["steps"] - steps, completions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loraq bench structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=70)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--valid-tokens", type=int, default=128, help="max_new_tokens of the validity pass")
    ap.add_argument("--rank", type=int, default=16, help="rank of the random adapters (0: base model only)")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of (a)-(c), taken in turn; medians")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", dest="json_out", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.requests < 2:
        ap.error("--repeats must be >= 1 and --requests >= 2")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    n, new = args.requests, args.new_tokens

    root = Path(tempfile.mkdtemp(prefix="loraq-bench-"))
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, adapter_root=str(root),
                          max_batch=n, adapter_slots=max(n, 1), max_lora_rank=max(args.rank, 1))
    progress(f"loading {args.model} ...")
    engine = Engine(config)
    prompts = make_prompts(engine.tokenizer, n, args.prompt_tokens)
    adapters: list[AdapterRef | None] = [None] * n
    if args.rank > 0:
        names = [f"bench/s{i:03d}" for i in range(n)]
        write_random_adapters(root, names, engine.spec, args.rank, parse_targets(args.targets))
        adapters = [AdapterRef(name) for name in names]
        progress(f"wrote {n} random rank-{args.rank} adapters, one per request")
    clock = GrammarClock(engine.grammar)
    roster = ResponseFormat.json_schema(ROSTER_SCHEMA)

    def requests(share: float, tokens: int, tag: str) -> list[GenerationRequest]:
        constrained = round(share * n)
        every = n / constrained if constrained else 0.0
        picked = {int(k * every) for k in range(constrained)}
        return [GenerationRequest(id=f"{tag}-{i}", prompt_token_ids=ids, adapter=adapters[i],
                                  params=SamplingParams(max_new_tokens=tokens, ignore_eos=True),
                                  response_format=roster if i in picked else None)
                for i, ids in enumerate(prompts)]

    progress("warm-up (adapter loads, first calls, the grammar's tokenizer index)")
    for key, share in SYSTEMS.items():
        run(engine, requests(share, 2, f"warm-{key}"))
    clock.take()

    times: dict[str, list[float]] = {key: [] for key in SYSTEMS}
    grammar_ms: dict[str, list[dict[str, float]]] = {key: [] for key in SYSTEMS}
    for rep in range(args.repeats):
        for key, share in SYSTEMS.items():
            elapsed, steps, results = run(engine, requests(share, new, f"{key}-{rep}"))
            assert all(r.generated_tokens == new for r in results), "every row runs to --new-tokens"
            times[key].append(elapsed / steps)
            grammar_ms[key].append(clock.take())
        progress(f"repeat {rep}: " + ", ".join(f"{key.split('_')[0]} {1000 * t[-1]:.1f} ms/step"
                                               for key, t in times.items()))

    def paired(x: str, y: str) -> float:
        """Step time of x / y: the median over repeats of the ratio within each repeat."""
        return statistics.median(t_x / t_y for t_x, t_y in zip(times[x], times[y], strict=True))

    step_ms = {key: 1000 * statistics.median(t) for key, t in times.items()}
    ratios = {"b/a": paired("b_half_constrained", "a_free"), "c/a": paired("c_all_constrained", "a_free")}
    where = {key: {name: statistics.median(r[name] for r in runs) for name in runs[0]}
             for key, runs in grammar_ms.items() if key != "a_free"}

    compile_ms = _compile_times(engine)
    valid = _validity(engine, prompts, adapters, args.valid_tokens)

    lora = f"rank {args.rank} adapters on {args.targets}" if args.rank else "base model"
    print(f"\nstructured output benchmark: {n} requests x {args.prompt_tokens} prompt tokens x {new} new "
          f"tokens, {lora}, "
          f"device {engine.model.device}, torch threads {torch.get_num_threads()}")
    print(f"{'system':24s} {'ms/step':>8s} {'mask fill':>10s} {'mask wait':>10s} {'unpack':>8s}")
    for key, ms in step_ms.items():
        w = where.get(key, {"fill_ms": 0.0, "wait_ms": 0.0, "unpack_ms": 0.0})
        print(f"{key:24s} {ms:8.2f} {w['fill_ms']:10.3f} {w['wait_ms']:10.3f} {w['unpack_ms']:8.3f}")
    for key, value in ratios.items():
        print(f"ratio step time {key:8s} {value:8.3f}")
    print(f"compile a new schema: {compile_ms['cold_ms']:.2f} ms; the same schema again (cached, "
          f"deep copy): {compile_ms['cached_ms']:.4f} ms")
    print(f"validity pass ({args.valid_tokens} new tokens): {valid['valid']}/{valid['total']} texts valid "
          f"against the schema; finish reasons {valid['finish_reasons']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"step_ms": step_ms, "ratios": ratios, "grammar_ms": where,
                                                   "compile_ms": compile_ms, "validity": valid}, indent=2))
    engine.shutdown()
    return 0


def _compile_times(engine: Engine) -> dict[str, float]:
    """A schema never seen (a fresh title), then the same one again. Runs on this thread while the
    engine is idle (the grammar's cache is the step thread's otherwise)."""
    fmt = ResponseFormat.json_schema({**CHARACTER_SCHEMA, "title": f"bench-{time.time_ns()}"})
    timed: Callable[[], float] = lambda: _seconds(lambda: engine.grammar.matcher(fmt))  # noqa: E731
    return {"cold_ms": 1000 * timed(), "cached_ms": 1000 * statistics.median(timed() for _ in range(20))}


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _validity(engine: Engine, prompts: list[list[int]], adapters: list[AdapterRef | None],
              tokens: int) -> dict[str, Any]:
    """Half greedy, half sampled at temperature 1, with the character schema; the texts validated."""
    import jsonschema  # a test dependency (from a checkout with .[worker,test])

    fmt = ResponseFormat.json_schema(CHARACTER_SCHEMA)
    requests = [GenerationRequest(id=f"valid-{i}", prompt_token_ids=ids, adapter=adapters[i], response_format=fmt,
                                  params=SamplingParams(max_new_tokens=tokens, do_sample=i % 2 == 1, seed=i))
                for i, ids in enumerate(prompts)]
    _, _, results = run(engine, requests)
    valid = 0
    for r in results:
        try:
            jsonschema.validate(json.loads(r.text), CHARACTER_SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    reasons: dict[str, int] = {}
    for r in results:
        reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
    return {"valid": valid, "total": len(results), "finish_reasons": reasons}


if __name__ == "__main__":
    raise SystemExit(main())
