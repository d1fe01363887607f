"""Issue 4 at scale, through the whole engine on the tiny random Llama: hundreds of adapters
through a small device tier and host budget (exact against PEFT, inside the budgets), a hot
adapter flood that must not starve cold ones, bad adapters that fail alone, adapters added or
changed while the engine runs, and the hub source against a local stand-in of its cache.

Adapters are written straight to safetensors (tests/builders.make_adapter). The oracle is PEFT
running one adapter alone: one PeftModel per adapter config whose LoRA weights are swapped in with
`set_peft_model_state_dict`, greedy by full recompute."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from structlog.testing import capture_logs

import engine.adapter_store as adapter_store
from engine.model_loader import ModelSpec
from engine.request import AdapterRef, Completion, ErrorType, GenerationFailure, GenerationRequest, SamplingParams
from tests.builders import hub_cache_standin, make_adapter, run_requests

EOS = 2  # the builders' tokenizer: <|im_end|>
# make_adapter options: mixed ranks and modules, so a slot reused by another variant must be
# re-padded and have the modules it no longer targets zeroed; large enough that every adapter
# changes the greedy tokens.
VARIANTS = (
    dict(r=8, alpha=16, targets=("q_proj", "v_proj"), scale=0.3),
    dict(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), scale=0.3),
    dict(r=2, alpha=4, targets=("gate_proj", "up_proj", "down_proj"), use_rslora=True, scale=0.3),
)
MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors: handing each op to a second thread costs more than the op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def llama(loaded_models):
    return loaded_models("llama")


def host_bytes_of(variant: int, spec: ModelSpec) -> int:
    """What one adapter of `variant` holds in the host tier: A [in, r] + B [r, out] per module, fp32."""
    r, targets = VARIANTS[variant]["r"], VARIANTS[variant]["targets"]
    return spec.num_layers * sum((spec.module_shapes[m][0] + spec.module_shapes[m][1]) * r * 4 for m in targets)


def prompt(i: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(3, 259, (3 + i % 10,), generator=g).tolist()


class PeftOracle:
    """Greedy tokens of PEFT with one adapter alone. One PeftModel per adapter config (on its own
    copy of the base); another adapter of the same config is loaded by swapping LoRA weights."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.models: dict[str, object] = {}
        self.current: dict[str, Path] = {}

    def _model(self, adapter_dir: Path):
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict

        key = (adapter_dir / "adapter_config.json").read_text()
        if key not in self.models:
            self.models[key] = PeftModel.from_pretrained(copy.deepcopy(self.base), adapter_dir).eval()
        elif self.current[key] != adapter_dir:
            loaded = set_peft_model_state_dict(self.models[key], load_file(adapter_dir / "adapter_model.safetensors"))
            assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
        self.current[key] = adapter_dir
        return self.models[key]

    def greedy(self, adapter_dir: Path | None, ids: list[int], new: int) -> list[int]:
        """Full recompute each token (no KV cache): nothing shared with the engine's paths."""
        model = self.base if adapter_dir is None else self._model(adapter_dir)
        ids, out = list(ids), []
        with torch.inference_mode():
            for _ in range(new):
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                out.append(token)
                ids.append(token)
                if token == EOS:
                    break
        return out


@pytest.fixture(scope="module")
def oracle(tiny_model_dirs) -> PeftOracle:
    return PeftOracle(tiny_model_dirs["llama"])


def request(rid: str, adapter: str | None, i: int, new: int = 4, source: str = "local",
            token: str | None = None) -> GenerationRequest:
    ref = AdapterRef(adapter, source=source, api_token=token) if adapter else None
    return GenerationRequest(id=rid, prompt_token_ids=prompt(i), params=SamplingParams(max_new_tokens=new), adapter=ref)


def tokens(outcome) -> list[int]:
    assert isinstance(outcome, Completion), outcome
    return list(outcome.token_ids)


def failed(outcome, error_type: ErrorType, retryable: bool = False) -> str:
    assert isinstance(outcome, GenerationFailure), outcome
    assert outcome.error.type is error_type and outcome.error.retryable is retryable, outcome.error.message
    return outcome.error.message


# ---- 300 adapters through 8 device slots and a host tier of ~32 ------------------------------------

def test_300_adapters_exact_and_inside_budgets(tmp_path, make_engine, llama, oracle):
    """Two waves over 300 adapters of mixed rank and modules (the second in reverse order: the
    last ~32 are still in the host tier, the rest reload from source): every output equals PEFT
    with that adapter alone; the device tier never holds more than 8, the host tier never more
    than its byte budget (by the store's accounting and by summing the tensors it holds, sampled
    from another thread and on every token); evictions happen and are logged one line each.
    (Wave 2 once stalled for PREFETCH_HOLD_S: prefetches of later adapters evicted the resident
    ones about to run.)"""
    spec = llama.spec
    n = 300
    names = [f"tenant{i:03d}/bot" for i in range(n)]
    for i, name in enumerate(names):
        make_adapter(spec, tmp_path / name, seed=i, **VARIANTS[i % 3])
    budget = 32 * sum(host_bytes_of(i % 3, spec) for i in range(n)) // n
    engine = make_engine(max_lora_rank=16, adapter_root=str(tmp_path), adapter_slots=8, adapter_host_bytes=budget,
                         max_batch=16)
    store = engine.adapter_store
    expected = {i: oracle.greedy(tmp_path / names[i], prompt(i), 4) for i in range(n)}
    assert len({tuple(t) for t in expected.values()}) >= 0.9 * n, "adapters must change the tokens"

    observed: list[tuple[int, int, int, int]] = []  # (host bytes by stats, measured, device used, pinned)

    def observe(_event=None) -> None:
        s = store.stats()
        with store._lock:  # the tensors the host tier really holds, not its bookkeeping
            held = [store.host.get(key) for key in store.host.keys()]
        measured = sum(A.nbytes + B.nbytes for w in held for A, B in w.modules.values())
        observed.append((s["host"]["bytes"], measured, s["device"]["used"], s["device"]["pinned"]))

    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            observe()
            time.sleep(0.001)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    with capture_logs() as logs:
        waves = []
        for wave, order in enumerate((range(n), reversed(range(n)))):
            reqs = [request(f"w{wave}-{i}", names[i], i) for i in order]
            waves.append(run_requests(engine, reqs, timeout=120, on_token=observe))
    stop.set()
    thread.join()

    for wave, outcomes in enumerate(waves):
        for i in range(n):
            assert tokens(outcomes[f"w{wave}-{i}"]) == expected[i], (wave, names[i])
    stats = engine.stats()["adapters"]
    assert stats["device"]["slots"] == 8 and all(a.shape[1] == 8 for a in store.slots.A.values())
    assert set(store.slots.A) == {"q_proj", "k_proj", "v_proj", "o_proj", *MLP}
    assert len(observed) > 2 * n
    for host, measured, used, pinned in observed:
        assert host <= budget and measured <= budget and used <= 8 and pinned <= 8, (host, measured, used, pinned)
    device, host = stats["device"], stats["host"]
    assert device["hits"] + device["misses"] == 2 * n and device["evictions"] == device["misses"] - 8 >= 2 * n - 48
    assert 2 * n - 64 <= stats["loads"] and stats["load_failures"] == 0  # wave 2 reloads most
    assert stats["loads"] - host["evictions"] == host["adapters"]
    assert stats["host"]["bytes"] <= budget and stats["device"]["pinned"] == 0
    events = [e["event"] for e in logs]
    assert events.count("adapter_loaded") == stats["loads"]
    assert events.count("adapter_evicted") == stats["device"]["evictions"] + stats["host"]["evictions"]


# ---- fairness: one hot adapter with 1000 jobs, 20 cold ones --------------------------------------

def test_hot_flood_does_not_starve_cold_adapters(tmp_path, make_engine, llama, oracle):
    """1000 jobs for one adapter, then 1 job each for 20 others (4 device slots, so the cold ones
    rotate through 3): every cold job finishes while hundreds of hot jobs still wait."""
    spec = llama.spec
    make_adapter(spec, tmp_path / "hot", seed=7, **VARIANTS[0])
    cold = [f"cold{i:02d}" for i in range(20)]
    for i, name in enumerate(cold):
        make_adapter(spec, tmp_path / name, seed=100 + i, **VARIANTS[i % 3])
    engine = make_engine(max_lora_rank=16, adapter_root=str(tmp_path), adapter_slots=4, max_batch=16)
    order: list[str] = []
    reqs = [request(f"hot-{i}", "hot", i % 7, new=2) for i in range(1000)]
    reqs += [request(f"cold-{i}", name, i, new=2) for i, name in enumerate(cold)]
    done = threading.Event()
    outcomes: dict = {}

    def finish(outcome) -> None:
        order.append(outcome.request_id)
        outcomes[outcome.request_id] = outcome
        if len(order) == len(reqs):
            done.set()

    for req in reqs:  # the flood first, then the cold jobs
        engine.submit(req, None, finish)
    hot_left = 1000 - len(order)  # the engine ran some hot jobs meanwhile
    assert hot_left >= 500
    assert done.wait(120), f"{len(order)}/{len(reqs)} finished"

    last_cold = max(order.index(f"cold-{i}") for i in range(20))
    hot_after = sum(rid.startswith("hot-") for rid in order[last_cold:])
    # most hot jobs left when the cold ones arrived finish after the last cold one: half is the bar
    assert hot_after >= hot_left // 2, f"only {hot_after} of {hot_left} hot jobs finished after the last cold one"
    for i, name in enumerate(cold):
        assert tokens(outcomes[f"cold-{i}"]) == oracle.greedy(tmp_path / name, prompt(i), 2), name
    hot = {i: oracle.greedy(tmp_path / "hot", prompt(i), 2) for i in range(7)}
    assert all(tokens(outcomes[f"hot-{i}"]) == hot[i % 7] for i in range(1000))


# ---- bad adapters fail alone --------------------------------------------------------------------

def test_bad_adapters_fail_their_jobs_others_flow(tmp_path, make_engine, llama, oracle):
    """One burst mixing good adapters, base jobs, and three jobs each for a missing adapter, a
    corrupt and a truncated safetensors file, and ids escaping the root (.., absolute, symlink):
    every bad job gets its error type (not retryable), each bad adapter is loaded once, and every
    good job's tokens equal PEFT's."""
    spec = llama.spec
    root, outside = tmp_path / "root", tmp_path / "outside"
    good = [f"good{i}" for i in range(4)]
    for i, name in enumerate(good):
        make_adapter(spec, root / name, seed=200 + i, **VARIANTS[i % 3])
    secret = make_adapter(spec, outside / "secret", seed=300, **VARIANTS[0])  # valid: escaping must not reach it
    (root / "link").symlink_to(secret)
    corrupt = make_adapter(spec, root / "corrupt", seed=301, **VARIANTS[0])
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 10)
    truncated = make_adapter(spec, root / "truncated", seed=302, **VARIANTS[0])
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad = {"no/such/adapter": ErrorType.ADAPTER_NOT_FOUND, "corrupt": ErrorType.ADAPTER_INVALID,
           "truncated": ErrorType.ADAPTER_INVALID, "../outside/secret": ErrorType.VALIDATION,
           str(secret): ErrorType.VALIDATION, "link": ErrorType.VALIDATION}
    engine = make_engine(max_lora_rank=16, adapter_root=str(root), adapter_slots=4)
    reqs, i = [], 0
    for rep in range(3):
        for name in [*bad, *good, None]:
            reqs.append(request(f"{rep}|{name}", name, i))
            i += 1
    outcomes = run_requests(engine, reqs, timeout=60)
    for req in reqs:
        name = req.id.split("|", 1)[1]
        if name in bad:
            message = failed(outcomes[req.id], bad[name])
            assert str(outside) not in message, "error messages never echo what lies outside the root"
            if name in ("corrupt", "truncated"):
                assert "adapter_model.safetensors" in message
        else:
            adapter_dir = None if name == "None" else root / name
            assert tokens(outcomes[req.id]) == oracle.greedy(adapter_dir, req.prompt_token_ids, 4), req.id
    stats = engine.stats()["adapters"]
    assert stats["load_failures"] == len(bad) and stats["loads"] == len(good)
    # remembered: a later job for a bad adapter is answered without another load; good ones still run
    again = run_requests(engine, [request("again-corrupt", "corrupt", 0), request("again-good", "good0", 0)])
    failed(again["again-corrupt"], ErrorType.ADAPTER_INVALID)
    assert tokens(again["again-good"]) == oracle.greedy(root / "good0", prompt(0), 4)
    assert engine.stats()["adapters"]["load_failures"] == len(bad)


# ---- hot set changes while running ---------------------------------------------------------------

def test_adapter_added_after_start_is_usable(tmp_path, make_engine, llama, oracle):
    """An adapter that did not exist when the engine started is usable at once; one that was asked
    for before it existed fails (remembered for adapter_failure_ttl_s), then works after the TTL."""
    spec = llama.spec
    engine = make_engine(max_lora_rank=16, adapter_root=str(tmp_path), adapter_failure_ttl_s=0.5)
    early = run_requests(engine, [request("early", "acme/late", 0)])
    failed(early["early"], ErrorType.ADAPTER_NOT_FOUND)
    make_adapter(spec, tmp_path / "acme" / "late", seed=400, **VARIANTS[1])
    make_adapter(spec, tmp_path / "acme" / "new", seed=401, **VARIANTS[0])
    fresh = run_requests(engine, [request("new", "acme/new", 1)])
    assert tokens(fresh["new"]) == oracle.greedy(tmp_path / "acme" / "new", prompt(1), 4)
    time.sleep(0.6)  # past the failure TTL
    late = run_requests(engine, [request("late", "acme/late", 2)])
    assert tokens(late["late"]) == oracle.greedy(tmp_path / "acme" / "late", prompt(2), 4)


def test_changed_adapter_picked_up_within_staleness_bound(tmp_path, make_engine, llama, oracle, monkeypatch):
    """New files for an adapter in the host and device tiers: a request submitted more than
    REVALIDATE_S (+ one load) after the change runs on the new weights, as the store promises."""
    monkeypatch.setattr(adapter_store, "REVALIDATE_S", 0.3)
    spec = llama.spec
    path = make_adapter(spec, tmp_path / "acme" / "bot", seed=500, **VARIANTS[0])
    v1 = {i: oracle.greedy(path, prompt(i), 4) for i in range(3)}
    engine = make_engine(max_lora_rank=16, adapter_root=str(tmp_path))
    first = run_requests(engine, [request("v1", "acme/bot", 0)])
    assert tokens(first["v1"]) == v1[0]
    make_adapter(spec, path, seed=501, **VARIANTS[1])  # new weights and a new config, same id
    v2 = {i: oracle.greedy(path, prompt(i), 4) for i in range(3)}
    assert v1 != v2
    time.sleep(adapter_store.REVALIDATE_S + 0.2)
    after = run_requests(engine, [request("v2a", "acme/bot", 1)])
    assert tokens(after["v2a"]) == v2[1]  # the very first request after the bound
    again = run_requests(engine, [request("v2b", "acme/bot", 2)])
    assert tokens(again["v2b"]) == v2[2]
    assert engine.stats()["adapters"]["loads"] == 2


# ---- hub source through the engine ---------------------------------------------------------------

def test_hub_adapters_through_engine(tmp_path, make_engine, llama, oracle, monkeypatch):
    """hub_enabled with the disk tier holding a stand-in of the hub cache, offline (no network):
    hub jobs run exactly (PEFT), `main` and a pinned revision both resolve, the org allow-list and
    unknown repos fail their jobs alone, a local adapter of the same name is a different adapter,
    and the api_token is never logged (a token's jobs read their own cache: test_tenants.py)."""
    from huggingface_hub import constants

    from engine.adapter_source import HubSource

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    spec = llama.spec
    src, cache, root = tmp_path / "src", tmp_path / "disk", tmp_path / "local"
    c1, c2 = "1" * 40, "2" * 40
    secret = "hf_very_secret_token"
    hub_cache_standin(HubSource(cache).cache_for(secret), "acme/bot", c1,
                      make_adapter(spec, src / "bot-v1", seed=600, **VARIANTS[0]))
    hub_cache_standin(cache, "acme/old", c2, make_adapter(spec, src / "old", seed=601, **VARIANTS[2]))
    hub_cache_standin(cache, "other/bot", c1, make_adapter(spec, src / "other", seed=602, **VARIANTS[0]))
    make_adapter(spec, root / "acme" / "bot", seed=603, **VARIANTS[1])  # local "acme/bot": another adapter
    engine = make_engine(max_lora_rank=16, adapter_root=str(root), hub_enabled=True, hub_allow_orgs=("acme",),
                         adapter_disk_dir=str(cache))
    reqs = [request("hub", "acme/bot", 0, source="hub", token=secret),
            request("hub-rev", f"acme/old@{c2}", 1, source="hub"),
            request("local", "acme/bot", 2),
            request("not-allowed", "other/bot", 3, source="hub"),
            request("unknown", "acme/nope", 4, source="hub"),
            request("bad-id", "../../etc/passwd", 5, source="hub"),
            request("base", None, 6)]
    with capture_logs() as logs:
        outcomes = run_requests(engine, reqs, timeout=60)
    assert tokens(outcomes["hub"]) == oracle.greedy(src / "bot-v1", prompt(0), 4)
    assert tokens(outcomes["hub-rev"]) == oracle.greedy(src / "old", prompt(1), 4)
    assert tokens(outcomes["local"]) == oracle.greedy(root / "acme" / "bot", prompt(2), 4)
    assert tokens(outcomes["base"]) == oracle.greedy(None, prompt(6), 4)
    assert "allow-list" in failed(outcomes["not-allowed"], ErrorType.VALIDATION)
    failed(outcomes["unknown"], ErrorType.ADAPTER_NOT_FOUND)
    failed(outcomes["bad-id"], ErrorType.VALIDATION)
    assert secret not in repr(logs), "api_token is never logged"
    stats = engine.stats()["adapters"]
    assert stats["disk"]["adapters"] == 2 and stats["disk"]["bytes"] > 0 and stats["loads"] == 3


def test_requests_that_never_ran_do_not_hold_the_host_budget(tmp_path, make_engine, llama):
    spec = llama.spec
    for i in range(5):
        make_adapter(spec, tmp_path / f"a{i}", seed=700 + i, **VARIANTS[0])
    engine = make_engine(max_lora_rank=16, adapter_root=str(tmp_path), adapter_host_bytes=4 * host_bytes_of(0, spec))
    expired = [GenerationRequest(id=f"expired{i}", prompt_token_ids=prompt(i), adapter=AdapterRef(f"a{i}"),
                                 deadline=time.time() - 1) for i in range(4)]
    for outcome in run_requests(engine, expired).values():
        failed(outcome, ErrorType.DEADLINE_EXCEEDED)
    while engine.stats()["adapters"]["loads"] < 4:  # their adapters were prefetched at submit
        time.sleep(0.01)
    fresh = run_requests(engine, [request("fresh", "a4", 0)], timeout=3)
    tokens(fresh["fresh"])
