"""Adapter-scale benchmark (issue 4): does latency stay flat as the number of adapters grows?

    python -m benchmarks.adapters                 # or: loraq bench adapters
    loraq bench adapters --requests 32 --json adapters.json

The seed scenario on the embedded SmolLM2-135M: a 70-token prompt, 10 new tokens (EOS ignored, so
every request does the same work), one request at a time (closed loop), rank-8 adapters on q/v.

1. register/load, loraq: 1000 adapters, one after another, through an adapter store of the
   engine's shape (source -> host -> device slot): the 1st vs the 1000th, p50/p99.
2. latency, loraq: with 1, 100 and 1000 adapters registered (loaded into the host tier before
   timing). With 1 every request uses it; with 100 and 1000 each request uses a different adapter
   than the last and one not resident in the device tier (an adapter stride through the set).
3. prefetch: a request for an adapter never loaded, on an idle engine (its load on the critical
   path), vs one whose adapter was prefetched while an earlier request ran (the worker prefetches
   every job it receives): time from submit to admission into a batch, and total latency.
4. latency, PEFT: the same requests on a PeftModel (the same base weights) with 1 and then 100
   adapters loaded (`set_adapter` + `generate`), each `load_adapter` timed. 1000 in PEFT is not
   run: its load time grows with every adapter loaded, so the output projects it from the growth
   measured over the first 100 instead.

Prints progress lines while it runs, then one table with the ratios (p50 at 1000 / p50 at 1;
PEFT / loraq). `--threads 1` (the default) keeps latencies steady on a small shared machine and
leaves a core for adapter loads, which run in background threads. Adapters are written, and the
store of step 1 built and run, on threads of their own beside the engine (README, "CPU threads").
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import torch

from benchmarks.common import make_prompts, on_own_thread, parse_targets, percentile, summary, write_random_adapters
from benchmarks.common import progress as _progress
from engine.config import EngineConfig
from engine.engine import Engine
from engine.lease import Lease
from engine.model_loader import ModelSpec
from engine.request import AdapterRef, Completion, GenerationRequest, Outcome, SamplingParams

STRIDE = 37  # coprime with every set size used: consecutive requests use different adapters
POLL_S = 0.0005


say = partial(_progress, "adapters")


def rotation(n: int, count: int, first: int = 0) -> list[int]:
    """Adapter index of each of `count` requests over adapters first..first+n-1: consecutive
    requests never share one, and none repeats within n requests."""
    return [first + (STRIDE * k) % n for k in range(count)]


class Loraq:
    """One engine; requests one at a time, wall time from submit to on_finish."""

    def __init__(self, config: EngineConfig, new_tokens: int) -> None:
        self.engine = Engine(config)
        self.params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        self._n = 0
        self._prefetched: Lease | None = None  # held until the next request is submitted

    def request(self, ids: list[int], adapter: str | None,
                prefetch: str | None = None) -> tuple[float, Completion]:
        """Latency (ms) and result of one request; `prefetch`: an adapter to prefetch as it is
        submitted, for the next request (as the worker prefetches the jobs it holds, and releases
        each prefetch once that job is submitted)."""
        done = threading.Event()
        box: list[Outcome] = []

        def finish(outcome: Outcome) -> None:
            box.append(outcome)
            done.set()

        self._n += 1
        start = time.perf_counter()
        self.engine.submit(GenerationRequest(id=f"b{self._n}", prompt_token_ids=ids, params=self.params,
                                             adapter=AdapterRef(adapter) if adapter else None), None, finish)
        if self._prefetched is not None:  # submitted: the engine holds the adapter itself now
            self._prefetched.release()
            self._prefetched = None
        if prefetch:
            self._prefetched = self.engine.prefetch(AdapterRef(prefetch))
        done.wait()
        ms = (time.perf_counter() - start) * 1e3
        outcome = box[0]
        if not isinstance(outcome, Completion):
            raise RuntimeError(f"request failed: {outcome}")
        return ms, outcome

    def register(self, names: list[str]) -> float:
        """Prefetch every adapter and wait until the store holds them (then let go of the
        prefetches: the host tier keeps them while its budget allows); seconds taken."""
        start = time.perf_counter()
        before = self.engine.adapter_store.stats()["loads"]
        leases = [self.engine.prefetch(AdapterRef(name)) for name in names]
        try:
            while True:
                s = self.engine.adapter_store.stats()
                if s["load_failures"]:
                    raise RuntimeError("adapter loads failed")
                if s["loads"] - before >= len(names) and not s["queued"] and not s["loading"]:
                    return time.perf_counter() - start
                time.sleep(0.01)
        finally:
            for lease in leases:
                lease.release()


def time_store_loads(config: EngineConfig, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                     names: list[str]) -> list[float]:
    """ms from `prefetch` to a pinned device slot for each adapter, one after another, in a store
    shaped like the engine's (slots, budgets), while every earlier one stays in its host tier.
    Builds the slots and places adapters in them: call it on a thread of its own."""
    from engine.adapter_store import AdapterStore
    from engine.lora_slots import LoraSlots

    slots = LoraSlots(spec, config.adapter_slots, config.max_lora_rank, device, dtype)
    store = AdapterStore(config, spec, slots)
    times = []
    for i, name in enumerate(names):
        ref = AdapterRef(name)
        start = time.perf_counter()
        lease = store.prefetch(ref)
        while (state := store.poll(ref)) == "loading":
            time.sleep(POLL_S)
        if state != "ready" or store.acquire(ref) is None:
            raise RuntimeError(f"{name}: {state}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        lease.release()  # as the engine does once the adapter holds a slot
        store.release(ref)
        if (i + 1) % 250 == 0:
            say(f"  registered {i + 1}/{len(names)} (last {times[-1]:.1f} ms)")
    store.close()
    return times


def peft_request(model: Any, ids: list[int], new_tokens: int, adapter: str) -> tuple[float, list[int]]:
    """Latency (ms) and new token ids; EOS is an ordinary token, as with loraq's ignore_eos (a
    `min_new_tokens` would instead forbid it, and change the tokens after it)."""
    start = time.perf_counter()
    model.set_adapter(adapter)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return (time.perf_counter() - start) * 1e3, out[0, len(ids):].tolist()


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loraq bench adapters", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--adapters", type=int, default=1000, help="the largest adapter count")
    ap.add_argument("--mid", type=int, default=100, help="the middle adapter count (also PEFT's)")
    ap.add_argument("--requests", type=int, default=20, help="timed requests per setting and system")
    ap.add_argument("--prefetch-requests", type=int, default=6, help="timed requests per prefetch case")
    ap.add_argument("--prompt-tokens", type=int, default=70)
    ap.add_argument("--new-tokens", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", dest="json_out", help="also write every number to this file ('-': stdout)")
    ap.add_argument("--verbose", action="store_true", help="keep the engine's info logs")
    args = ap.parse_args(argv)
    if not 1 < args.mid < args.adapters:
        ap.error("need 1 < --mid < --adapters")
    if args.mid < 3 and not args.skip_peft:
        ap.error("PEFT's load-time fit needs --mid >= 3 (or --skip-peft)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.verbose:  # thousands of per-request / per-load log lines would bury the progress
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    targets = parse_targets(args.targets)
    big, mid, reqs = args.adapters, args.mid, args.requests
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="loraq-bench-adapters-"))
    out: dict[str, Any] = {"setup": {
        "model": args.model, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "rank": args.rank, "targets": targets, "requests_per_setting": reqs,
        "torch_threads": torch.get_num_threads(), "counts": [1, mid, big]}}
    try:
        config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, adapter_root=str(root),
                              max_lora_rank=args.rank)
        say(f"loading {args.model} (torch threads {torch.get_num_threads()})")
        loraq = Loraq(config, args.new_tokens)
        engine = loraq.engine
        spec, tok = engine.spec, engine.tokenizer
        device, dtype = engine.model.device, engine.model.dtype
        out["setup"].update(device=str(device), dtype=str(dtype),
                            device_slots=config.adapter_slots, host_bytes=config.adapter_host_bytes)

        say(f"writing {big} + {2 * args.prefetch_requests + 1} random PEFT adapters (rank {args.rank} on "
            f"{','.join(targets)}) under {root}")
        names = [f"tenant{i:04d}/bot" for i in range(big)]
        extra = ["warmup/bot", *(f"cold/{kind}{i}" for kind in ("plain", "pref")
                                 for i in range(args.prefetch_requests))]
        t0 = time.perf_counter()
        write_random_adapters(root, names + extra, spec, args.rank, targets)
        adapter_mb = sum(f.stat().st_size for f in (root / names[0]).iterdir()) / 2**20
        say(f"  wrote {len(names) + len(extra)} adapters of {adapter_mb:.2f} MB in {time.perf_counter() - t0:.1f} s")
        prompts = make_prompts(tok, max(reqs, args.prefetch_requests, 3), args.prompt_tokens)

        # 1. register/load, source -> device, the 1st .. the 1000th
        say(f"loraq: registering {big} adapters one at a time (source -> host -> device slot)")
        loads = on_own_thread(lambda: time_store_loads(config, spec, device, dtype, names))
        gc.collect()
        window = max(1, min(100, big // 10))
        out["loraq_register_ms"] = {"first": loads[0], "last": loads[-1],
                                    f"first_{window}": summary(loads[:window]),
                                    f"last_{window}": summary(loads[-window:]), "all": summary(loads)}

        # 2. latency with 1, mid, big adapters registered
        say("loraq: warm-up")
        for k in range(3):
            loraq.request(prompts[k], names[0])
            loraq.request(prompts[k], "warmup/bot")
        lat: dict[int, list[float]] = {}
        same: dict[int, list[float]] = {}
        queue: dict[int, list[float]] = {}
        tokens: dict[int, list[list[int]]] = {}
        # adapter 0 is the same-adapter control; the rotations never use it
        plans = {1: [0] * reqs, mid: rotation(mid - 1, reqs, first=1), big: rotation(big - mid, reqs, first=mid)}
        registered = 1
        for n, plan in plans.items():
            if n > registered:
                seconds = loraq.register(names[registered:n])
                say(f"loraq: registered adapters {registered + 1}..{n} into the host tier in {seconds:.1f} s "
                    f"({(n - registered) / seconds:.0f}/s)")
                out.setdefault("loraq_bulk_register_per_s", {})[n] = (n - registered) / seconds
                registered = n
            say(f"loraq: {reqs} requests, {n} adapter{'s' if n > 1 else ''} registered"
                + (", each after a same-adapter control request" if n > 1 else ""))
            lat[n], same[n], queue[n], tokens[n] = [], [], [], []
            for k, idx in enumerate(plan):
                if n > 1:  # measured in the same time window: drift on a shared box cancels out
                    same[n].append(loraq.request(prompts[k], names[0])[0])
                ms, result = loraq.request(prompts[k], names[idx])
                lat[n].append(ms)
                queue[n].append(result.timings.queue_ms)
                tokens[n].append(list(result.token_ids))
            say(f"  p50 {percentile(lat[n], 50):.0f} ms  p99 {percentile(lat[n], 99):.0f} ms  submit -> admitted "
                f"p50 {percentile(queue[n], 50):.1f} ms"
                + (f"  (same adapter: p50 {percentile(same[n], 50):.0f} ms)" if n > 1 else ""))
        out["loraq_latency_ms"] = {n: summary(v) for n, v in lat.items()}
        out["loraq_same_adapter_ms"] = {n: summary(v) for n, v in same.items() if v}
        out["loraq_queue_ms"] = {n: summary(v) for n, v in queue.items()}

        # 3. prefetch: cold adapter on the critical path vs prefetched while an earlier request ran
        p = args.prefetch_requests
        say(f"loraq: prefetch, {p} requests for never-loaded adapters, without and with prefetch")
        cases: dict[str, dict[str, list[float]]] = {
            c: {"total": [], "queue": [], "load": []} for c in ("resident", "plain", "pref")}
        for i in range(p):
            for case, adapter, ahead in (("resident", names[mid + i], f"cold/pref{i}"),  # the earlier request
                                         ("pref", f"cold/pref{i}", None), ("plain", f"cold/plain{i}", None)):
                ms, result = loraq.request(prompts[i], adapter, prefetch=ahead)
                for key, value in (("total", ms), ("queue", result.timings.queue_ms),
                                   ("load", result.timings.adapter_load_ms)):
                    cases[case][key].append(value)
        plain_q, pref_q = percentile(cases["plain"]["queue"], 50), percentile(cases["pref"]["queue"], 50)
        out["prefetch_ms"] = {case: {key: summary(v) for key, v in d.items()} for case, d in cases.items()}
        out["prefetch_ms"]["hidden_fraction"] = 1 - pref_q / plain_q if plain_q > 0 else None
        out["loraq_stats"] = engine.stats()["adapters"]
        engine.shutdown()
        hf_model = engine.model.hf_model  # the engine never changes the weights: PEFT reuses them
        del loraq, engine
        gc.collect()

        # 4. PEFT with 1 and mid adapters
        if not args.skip_peft:
            from peft import PeftModel

            say("PEFT: loading adapter 1")
            t0 = time.perf_counter()
            peft = PeftModel.from_pretrained(hf_model, str(root / names[0]), adapter_name=names[0]).eval()
            peft_loads = [(time.perf_counter() - t0) * 1e3]
            peft_request(peft, prompts[0], 2, names[0])  # warm-up
            peft_lat: dict[int, list[float]] = {}
            peft_same: dict[int, list[float]] = {}
            agree = {}
            for n, plan in list(plans.items())[:2]:
                while len(peft_loads) < n:
                    i = len(peft_loads)
                    t0 = time.perf_counter()
                    peft.load_adapter(str(root / names[i]), adapter_name=names[i])
                    peft_loads.append((time.perf_counter() - t0) * 1e3)
                    if (i + 1) % 10 == 0:
                        say(f"  PEFT load_adapter #{i + 1}: {peft_loads[-1]:.0f} ms")
                peft.eval()
                say(f"PEFT: {reqs} requests, {n} adapter{'s' if n > 1 else ''} loaded")
                peft_lat[n], peft_same[n], equal = [], [], 0
                for k, idx in enumerate(plan):
                    if n > 1:
                        peft_same[n].append(peft_request(peft, prompts[k], args.new_tokens, names[0])[0])
                    ms, ids = peft_request(peft, prompts[k], args.new_tokens, names[idx])
                    peft_lat[n].append(ms)
                    equal += ids == tokens[n][k]
                agree[n] = equal / len(plan)
                say(f"  p50 {percentile(peft_lat[n], 50):.0f} ms  p99 {percentile(peft_lat[n], 99):.0f} ms  "
                    f"(greedy tokens equal to loraq's: {agree[n]:.0%})"
                    + (f"  (same adapter: p50 {percentile(peft_same[n], 50):.0f} ms)" if n > 1 else ""))
            xs = list(range(2, len(peft_loads) + 1))
            a, b = linear_fit(xs, peft_loads[1:])
            out["peft_latency_ms"] = {n: summary(v) for n, v in peft_lat.items()}
            out["peft_same_adapter_ms"] = {n: summary(v) for n, v in peft_same.items() if v}
            out["peft_token_agreement"] = agree
            out["peft_load_adapter_ms"] = {"first": peft_loads[0], "last": peft_loads[-1], "all": peft_loads,
                                           "fit_ms": a, "fit_ms_per_adapter_loaded": b,
                                           f"projected_{big}th_ms": a + b * big,
                                           f"projected_total_{big}_s": sum(a + b * i for i in range(2, big + 1)) / 1e3}
            out["peft_not_run"] = (f"{big} adapters in PEFT: load_adapter grows with every adapter loaded "
                                   f"(+{b:.1f} ms each, fitted over {len(peft_loads)} loads); loading {big} would "
                                   f"take ~{out['peft_load_adapter_ms'][f'projected_total_{big}_s'] / 60:.0f} min "
                                   f"here, so latency at {big} was not measured")
        out["seconds"] = time.perf_counter() - t_start
        print_table(out, big, mid)
        if args.json_out:
            text = json.dumps(out, indent=2, default=str)
            if args.json_out == "-":
                print(text)
            else:
                Path(args.json_out).write_text(text)
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def print_table(out: dict, big: int, mid: int) -> None:
    s = out["setup"]
    lq, pf = out["loraq_latency_ms"], out.get("peft_latency_ms", {})
    lq_same, pf_same = out["loraq_same_adapter_ms"], out.get("peft_same_adapter_ms", {})
    print(f"\nadapter-scale benchmark: {s['model']} on {s['device']} ({s['dtype']}), {s['prompt_tokens']}-token "
          f"prompt + {s['new_tokens']} new tokens, one request at a time, {s['requests_per_setting']} timed "
          f"requests per cell, rank {s['rank']} on {','.join(s['targets'])}, torch threads {s['torch_threads']}, "
          f"{s['device_slots']} device slots")
    print("latency ms (same: a request on one resident adapter, alternated with the rotation's requests)")
    print(f"{'adapters':>8s} | {'loraq p50':>9s} {'p99':>5s} {'same':>5s} | {'PEFT p50':>9s} {'p99':>5s} "
          f"{'same':>5s} | {'PEFT/loraq p50':>14s}")

    def cells(lat: dict, same: dict, n: int) -> str:
        if n not in lat:
            return f"{'not run':>21s}"
        return f"{lat[n]['p50']:9.0f} {lat[n]['p99']:5.0f} {same[n]['p50'] if n in same else float('nan'):5.0f}"

    for n in (1, mid, big):
        ratio = f"{pf[n]['p50'] / lq[n]['p50']:14.2f}" if n in pf else f"{'-':>14s}"
        print(f"{n:8d} | {cells(lq, lq_same, n)} | {cells(pf, pf_same, n)} | {ratio}")
    print(f"ratio p50 {big}/1, loraq: {lq[big]['p50'] / lq[1]['p50']:.2f} (target <= 1.10); against the same-adapter "
          f"requests measured alongside: {lq[big]['p50'] / lq_same[big]['p50']:.2f}")
    print(f"ratio p50 {mid}/1: loraq {lq[mid]['p50'] / lq[1]['p50']:.2f}"
          + (f", PEFT {pf[mid]['p50'] / pf[1]['p50']:.2f}" if mid in pf else ""))
    queue = out["loraq_queue_ms"]
    print("loraq submit -> admitted p50 ms: " + ", ".join(f"{n} adapters {queue[n]['p50']:.1f}" for n in queue))
    reg = out["loraq_register_ms"]
    w = next(k for k in reg if k.startswith("first_")).split("_")[1]
    print(f"loraq register/load, source -> device slot: #1 {reg['first']:.1f} ms, #{big} {reg['last']:.1f} ms; "
          f"first {w} p50/p99 {reg[f'first_{w}']['p50']:.1f}/{reg[f'first_{w}']['p99']:.1f} ms, "
          f"last {w} p50/p99 {reg[f'last_{w}']['p50']:.1f}/{reg[f'last_{w}']['p99']:.1f} ms "
          f"(last/first p50 {reg[f'last_{w}']['p50'] / reg[f'first_{w}']['p50']:.2f})")
    if "peft_load_adapter_ms" in out:
        pl = out["peft_load_adapter_ms"]
        n = len(pl["all"])
        print(f"PEFT load_adapter: #1 {pl['first']:.0f} ms, #{n} {pl['last']:.0f} ms "
              f"(#{n}/#1 {pl['last'] / pl['first']:.1f}x; fitted +{pl['fit_ms_per_adapter_loaded']:.1f} ms per adapter "
              f"already loaded: #{big} ~{pl[f'projected_{big}th_ms'] / 1e3:.1f} s)")
        print(f"not run: {out['peft_not_run']}")
        print("greedy tokens equal between loraq and PEFT: "
              + ", ".join(f"{n} adapters {v:.0%}" for n, v in out["peft_token_agreement"].items()))
    p = out["prefetch_ms"]
    hidden = p["hidden_fraction"]
    print(f"prefetch, never-loaded adapter (source load p50 {p['plain']['load']['p50']:.1f} ms): submit -> admitted "
          f"p50 {p['plain']['queue']['p50']:.1f} ms not prefetched, {p['pref']['queue']['p50']:.1f} ms prefetched "
          f"while an earlier request ran" + (f" ({hidden:.0%} hidden)" if hidden is not None else "")
          + f"; latency p50 {p['plain']['total']['p50']:.0f} / {p['pref']['total']['p50']:.0f} ms, "
          f"resident adapter {p['resident']['total']['p50']:.0f} ms")
    st = out["loraq_stats"]
    print(f"loraq tiers: device hits/misses/evictions {st['device']['hits']}/{st['device']['misses']}/"
          f"{st['device']['evictions']}, host hits/misses/evictions {st['host']['hits']}/{st['host']['misses']}/"
          f"{st['host']['evictions']} ({st['host']['bytes'] / 2**20:.0f} MiB of "
          f"{st['host']['budget_bytes'] / 2**20:.0f}), source loads p50/p99 {st['load_ms_p50']:.1f}/"
          f"{st['load_ms_p99']:.1f} ms")
    print(f"total {out['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
