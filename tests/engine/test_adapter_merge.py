"""Per-request adapter merging (LoRAX's `merged_adapters`): the wire's validation and defaults, the
key a merge is cached under, the strategies bit for bit against PEFT's merge_utils, the store
building a merge once and rebuilding it when an adapter's files change, and the whole engine
generating token for token what PEFT's `add_weighted_adapter` generates."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from structlog.testing import capture_logs

import engine.adapter_store as adapter_store
from consumer import protocol
from consumer.protocol import Limits, ProtocolError
from engine.adapter import LoraTensors
from engine.adapter_merge import merge_lora, merge_tensors
from engine.adapter_source import HubSource
from engine.request import (
    MERGE_STRATEGIES,
    AdapterRef,
    Completion,
    EngineError,
    ErrorType,
    GenerationFailure,
    GenerationRequest,
    MergedAdapters,
    SamplingParams,
)
from tests.builders import make_adapter, run_requests
from tests.engine.test_adapter_store import SPEC as STORE_SPEC
from tests.engine.test_adapter_store import Counting, hub_standin, make_store, wait_ready


def parse(merged, **params) -> MergedAdapters | None:
    return protocol.parse_parameters({"merged_adapters": merged, **params}, Limits()).merged_adapters


def parse_error(merged, **params) -> str:
    with pytest.raises(ProtocolError) as e:
        parse(merged, **params)
    assert e.value.error_type == protocol.VALIDATION
    return e.value.message


# ---- the wire: LoRAX's names, defaults and validation -------------------------------------------

def test_lorax_defaults():
    m = parse({"ids": ["a", "b"], "weights": [0.25, 0.75]})
    assert m == MergedAdapters(("a", "b"), (0.25, 0.75), "linear", 0.0, "total")
    assert parse(None) is None
    # LoRAX's router upper-cases both names before looking them up
    m = parse({"ids": ["a", "b"], "weights": [1, 2], "merge_strategy": "TIES", "density": 0.5,
               "majority_sign_method": "Frequency"})
    assert (m.merge_strategy, m.density, m.majority_sign_method, m.weights) == ("ties", 0.5, "frequency", (1.0, 2.0))


@pytest.mark.parametrize("merged, params, field", [
    ({"ids": ["a", "b"], "weights": [1, 1]}, {"adapter_id": "a"}, "merged_adapters: at most one of adapter_id"),
    ({"ids": [], "weights": []}, {}, "merged_adapters.ids must hold at least one"),
    ({"ids": ["a", "b"]}, {}, "merged_adapters.weights must have as many entries as ids (2), got 0"),
    ({"ids": ["a", "b"], "weights": [1.0]}, {}, "merged_adapters.weights must have as many"),
    ({"ids": ["a"], "weights": [1, 2]}, {}, "merged_adapters.weights must have as many"),
    ({"ids": ["a", "b"], "weights": [1, 1], "density": 1.5}, {}, "merged_adapters.density must be in [0, 1]"),
    ({"ids": ["a", "b"], "weights": [1, 1], "density": -0.1}, {}, "merged_adapters.density must be in [0, 1]"),
    ({"ids": ["a", "b"], "weights": [1, 1], "merge_strategy": "ties"}, {}, "merged_adapters.density must be > 0"),
    ({"ids": ["a", "b"], "weights": [1, 1], "merge_strategy": "svd"}, {}, "merged_adapters.merge_strategy"),
    ({"ids": ["a", "b"], "weights": [1, 1], "majority_sign_method": "max"}, {},
     "merged_adapters.majority_sign_method"),
    ({"ids": "a", "weights": [1]}, {}, "merged_adapters.ids must be a list"),
    ({"weights": [1]}, {}, "merged_adapters.ids must be a list"),
    ({"ids": ["a", ""], "weights": [1, 1]}, {}, "merged_adapters.ids must be non-empty strings"),
    ({"ids": ["a", "b\x01"], "weights": [1, 1]}, {}, "merged_adapters.ids[1] contains control characters"),
    ({"ids": ["a", "b"], "weights": [1, True]}, {}, "merged_adapters.weights must be a list of numbers"),
    ({"ids": ["a", "b"], "weights": [1, 1], "density": "0.5"}, {}, "merged_adapters.density must be a number"),
    ({"ids": ["a"] * 17, "weights": [1] * 17}, {}, "merged_adapters.ids has more than 16"),
    (["a", "b"], {}, "merged_adapters must be a map"),
])
def test_lorax_validation_names_the_field(merged, params, field):
    assert f"parameters.{field}" in parse_error(merged, **params)


def test_job_body_with_merged_adapters_round_trips():
    merged = {"ids": ["a", "b"], "weights": [0.5, 0.5], "merge_strategy": "dare_ties", "density": 0.4}
    body = protocol.encode_job(inputs="hi", parameters={"merged_adapters": merged}, content_type=protocol.JSON)
    job = protocol.decode_job(body, protocol.JSON, None, "j1", None, None, None, Limits())
    assert job.parameters.merged_adapters == MergedAdapters(("a", "b"), (0.5, 0.5), "dare_ties", 0.4)
    assert job.adapter_id is None


# ---- the cache key: derived from the definition ------------------------------------------------

def test_key_derived_from_the_definition_never_the_token():
    base = MergedAdapters(("a", "b"), (0.5, 0.5), "ties", 0.5, "total")
    ref = AdapterRef.merged(base, "local", api_token="hf_secret")
    assert ref.key == AdapterRef.merged(base).key  # the token is no part of it (the source's scope is)
    assert "hf_secret" not in ref.key and "hf_secret" not in repr(ref)
    variants = [MergedAdapters(("b", "a"), (0.5, 0.5), "ties", 0.5),
                MergedAdapters(("a", "b"), (0.5, 0.6), "ties", 0.5),
                MergedAdapters(("a", "b"), (0.5, 0.5), "dare_ties", 0.5),
                MergedAdapters(("a", "b"), (0.5, 0.5), "ties", 0.6),
                MergedAdapters(("a", "b"), (0.5, 0.5), "ties", 0.5, "frequency")]
    keys = {AdapterRef.merged(m).key for m in [base, *variants]}
    assert len(keys) == 6
    assert AdapterRef.merged(base, "hub").key != ref.key
    assert AdapterRef(ref.id).key != ref.key  # a plain adapter named like a merge is another adapter
    # one id is that adapter itself, as LoRAX loads it
    assert AdapterRef.merged(MergedAdapters(("a",), (0.3,)), "hub", "t") == AdapterRef("a", "hub", "t")


# ---- the math ----------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", MERGE_STRATEGIES)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_strategies_equal_peft_merge_utils(strategy, density, sign):
    """Bit for bit PEFT's functions (which LoRAX's strategies copy), DARE's masks included: ours
    come from a generator seeded like PEFT's global one, drawn in the same order."""
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(6, 10, generator=g) for _ in range(3)]
    weights = torch.tensor([0.7, -0.4, 1.3])
    merge = MergedAdapters(("a", "b", "c"), tuple(weights.tolist()), strategy, density, sign)
    peft = {"linear": lambda: merge_utils.task_arithmetic(tensors, weights),
            "ties": lambda: merge_utils.ties(tensors, weights, density, sign),
            "dare_linear": lambda: merge_utils.dare_linear(tensors, weights, density),
            "dare_ties": lambda: merge_utils.dare_ties(tensors, weights, density, sign)}[strategy]
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        expected = peft()
    assert torch.equal(merge_tensors(tensors, weights, merge, torch.Generator().manual_seed(1234)), expected)


def _lora(modules: dict, scale: float) -> LoraTensors:
    return LoraTensors({k: (a, b, s) for k, (a, b, s) in modules.items()}, scale)


def test_weights_apply_to_a_and_to_b_with_the_first_adapters_scale():
    """linear: A = sum w_i A_i, B = sum w_i B_i (so the delta has cross terms), scaled by the first
    adapter's scale, for a module only the second targets too; targets are merged as a union."""
    g = torch.Generator().manual_seed(0)
    a1, b1, a2, b2, a3, b3 = (torch.randn(4, 8, generator=g) if i % 2 == 0 else torch.randn(8, 4, generator=g)
                              for i in range(6))
    first = _lora({(0, "q_proj"): (a1, b1, 2.0)}, scale=2.0)
    second = _lora({(0, "q_proj"): (a2, b2, 0.5), (1, "v_proj"): (a3, b3, 0.5)}, scale=0.5)
    merged = merge_lora([first, second], MergedAdapters(("x", "y"), (0.3, 0.9)))
    a, b, scale = merged.modules[(0, "q_proj")]
    assert torch.allclose(a, 0.3 * a1 + 0.9 * a2) and torch.allclose(b, 0.3 * b1 + 0.9 * b2) and scale == 2.0
    delta = scale * b @ a
    assert not torch.allclose(delta, 0.3 * 2.0 * b1 @ a1 + 0.9 * 0.5 * b2 @ a2, atol=1e-3)
    a, b, scale = merged.modules[(1, "v_proj")]  # only the second adapter targets it
    assert torch.allclose(a, 0.9 * a3) and torch.allclose(b, 0.9 * b3) and scale == 2.0


def test_different_ranks_on_one_module_are_a_validation_error():
    first = _lora({(0, "q_proj"): (torch.ones(4, 8), torch.ones(8, 4), 1.0)}, 1.0)
    second = _lora({(0, "q_proj"): (torch.ones(2, 8), torch.ones(8, 2), 1.0)}, 1.0)
    with pytest.raises(EngineError) as e:
        merge_lora([first, second], MergedAdapters(("x", "y"), (1, 1)))
    assert e.value.type is ErrorType.VALIDATION and not e.value.retryable
    assert "parameters.merged_adapters" in e.value.message and "0 q_proj" in e.value.message
    assert "{'x': 4, 'y': 2}" in e.value.message


# ---- the store: built once, cached under its key, rebuilt when an adapter changes ---------------

def test_merge_built_once_on_a_loader_thread_and_cached(tmp_path):
    make_adapter(STORE_SPEC, tmp_path / "a", seed=1)
    make_adapter(STORE_SPEC, tmp_path / "b", seed=2)
    source = Counting(tmp_path)
    store = make_store(tmp_path, sources={"local": source})
    ref = AdapterRef.merged(MergedAdapters(("a", "b"), (0.5, 0.5)))
    with capture_logs() as logs:
        leases = [store.prefetch(ref) for _ in range(3)]
        assert wait_ready(store, ref) == "ready"
        assert wait_ready(store, AdapterRef.merged(MergedAdapters(("a", "b"), (0.5, 0.5)))) == "ready"
    assert [e["event"] for e in logs].count("adapter_merged") == 1
    assert source.fetches == {"a": 1, "b": 1} and store.stats()["loads"] == 1
    assert ref.key in store.host and "local:a" not in store.host  # the merge alone is cached
    slot = store.acquire(ref)
    assert slot is not None and store.slots.ranks[slot] == 8
    store.release(ref)
    for lease in leases:
        lease.release()
    store.close()


def test_changed_adapter_files_give_a_new_merged_version(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_store, "REVALIDATE_S", 0.0)
    make_adapter(STORE_SPEC, tmp_path / "a", fill=1.0)
    make_adapter(STORE_SPEC, tmp_path / "b", fill=2.0)
    store = make_store(tmp_path)
    ref = AdapterRef.merged(MergedAdapters(("a", "b"), (0.5, 0.25)))
    wait_ready(store, ref)
    generation, _ = store.last_load(ref)
    slot = store.acquire(ref)
    assert store.slots.A["q_proj"][0, slot, 0, 0] == pytest.approx(0.5 * 1.0 + 0.25 * 2.0)  # A = [r, in]
    store.release(ref)
    make_adapter(STORE_SPEC, tmp_path / "b", fill=6.0)  # one adapter's files replaced
    lease = store.prefetch(ref)
    deadline = time.monotonic() + 10
    while store.last_load(ref)[0] == generation:
        assert time.monotonic() < deadline, "the merge was not rebuilt"
        time.sleep(0.01)
    slot = store.acquire(ref)
    assert store.slots.A["q_proj"][0, slot, 0, 0] == pytest.approx(0.5 * 1.0 + 0.25 * 6.0)
    store.release(ref)
    lease.release()
    store.close()


def test_hub_merge_keeps_its_snapshots_in_the_disk_tier(tmp_path):
    """A merge of hub adapters: its snapshots are counted in the disk tier under their own keys."""
    cache = tmp_path / "cache"
    hub_standin(cache, "o1/bot", "1" * 40, seed=1)
    hub_standin(cache, "o2/bot", "2" * 40, seed=2)
    store = make_store(tmp_path, sources={"hub": HubSource(cache, offline=True)}, hub_enabled=True)
    ref = AdapterRef.merged(MergedAdapters(("o1/bot", "o2/bot"), (1, 1), "ties", 0.5), "hub")
    assert wait_ready(store, ref) == "ready"
    assert set(store.disk.keys()) == {"hub:o1/bot", "hub:o2/bot"} and list(store.host.keys()) == [ref.key]
    store.close()


def test_an_adapters_error_names_its_id(tmp_path):
    make_adapter(STORE_SPEC, tmp_path / "a", r=8)
    make_adapter(STORE_SPEC, tmp_path / "r4", r=4)
    store = make_store(tmp_path)
    missing = wait_ready(store, AdapterRef.merged(MergedAdapters(("a", "nope"), (1, 1))))
    assert missing.type is ErrorType.ADAPTER_NOT_FOUND
    assert missing.message.startswith("parameters.merged_adapters.ids[1] 'nope': ")
    ranks = wait_ready(store, AdapterRef.merged(MergedAdapters(("a", "r4"), (1, 1))))
    assert ranks.type is ErrorType.VALIDATION and "parameters.merged_adapters" in ranks.message
    store.close()


# ---- the engine against PEFT's add_weighted_adapter --------------------------------------------

# equal ranks (every strategy needs them), different alphas and targets (merged as a union)
MERGE_ADAPTERS = {
    "m1": dict(r=8, alpha=16, targets=("q_proj", "v_proj")),
    "m2": dict(r=8, alpha=8, targets=("q_proj", "v_proj", "o_proj")),
    "m3": dict(r=8, alpha=32, targets=("v_proj", "gate_proj", "down_proj")),
    "r4": dict(r=4, alpha=8, targets=("q_proj", "v_proj")),
}
CASES = [  # (ids, LoRAX weights, merge_strategy, density, majority_sign_method)
    (("m1", "m2"), (0.6, 0.9), "linear", 0.0, "total"),
    (("m1", "m2", "m3"), (1.0, 0.5, 0.8), "linear", 0.0, "total"),
    (("m1", "m2", "m3"), (0.7, 1.1, 0.6), "ties", 0.5, "total"),
    (("m2", "m3"), (1.2, 0.4), "ties", 0.3, "frequency"),
    (("m3", "m1"), (0.8, 0.8), "dare_linear", 1.0, "total"),
    (("m1", "m2", "m3"), (0.5, 1.0, 0.9), "dare_ties", 1.0, "frequency"),
]


@pytest.fixture(scope="module")
def merge_setup(tiny_model_dirs, tmp_path_factory):
    """(adapter root, PeftModel with every adapter loaded) on the tiny Llama."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merge_adapters")
    for seed, (name, kw) in enumerate(MERGE_ADAPTERS.items()):
        make_adapter(tiny_model_dirs["llama"], root / name, seed=seed + 40, scale=0.25, **kw)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32).eval()
    names = list(MERGE_ADAPTERS)
    peft = PeftModel.from_pretrained(base, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(root / name, adapter_name=name)
    return root, peft.eval()


def peft_weights(ids: tuple[str, ...], weights: tuple[float, ...]) -> list[float]:
    """PEFT's weights for LoRAX's merge. PEFT scales A by sqrt(w'_i * s_i) and B by the same and
    gives the result scale 1; LoRAX scales A and B by w_i and the result by the first adapter's
    s_0. So w'_i = w_i^2 * s_0 / s_i (for w_i >= 0: PEFT takes B's root unsigned)."""
    scale = {name: kw["alpha"] / kw["r"] for name, kw in MERGE_ADAPTERS.items()}
    return [w * w * scale[ids[0]] / scale[i] for i, w in zip(ids, weights, strict=True)]


def peft_greedy(peft, adapter: str | None, ids: list[int], new: int) -> list[int]:
    kw = dict(attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=new, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        if adapter is None:
            with peft.disable_adapter():
                return peft.generate(input_ids=torch.tensor([ids]), **kw)[0, len(ids):].tolist()
        peft.set_adapter(adapter)
        return peft.generate(input_ids=torch.tensor([ids]), **kw)[0, len(ids):].tolist()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(99)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in (5, 14, 23)]


def test_merged_adapters_greedy_match_peft_add_weighted_adapter(make_engine, merge_setup):
    """Every case in one batch with its constituents and the base model: each merged row's greedy
    tokens equal PEFT generating with add_weighted_adapter's merge of the same adapters."""
    root, peft = merge_setup
    engine = make_engine("llama", adapter_root=str(root), adapter_slots=12, max_lora_rank=16)
    requests, expected = [], {}
    for c, (ids, weights, strategy, density, sign) in enumerate(CASES):
        name = f"case{c}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
            peft.add_weighted_adapter(list(ids), peft_weights(ids, weights), name, combination_type=strategy,
                                      density=density, majority_sign_method=sign)
        ref = AdapterRef.merged(MergedAdapters(ids, weights, strategy, density, sign))
        for p, prompt in enumerate(prompts()):
            requests.append(GenerationRequest(id=f"{name}-{p}", prompt_token_ids=prompt,
                                              params=SamplingParams(max_new_tokens=10), adapter=ref))
            expected[f"{name}-{p}"] = peft_greedy(peft, name, prompt, 10)
    for adapter in ("m1", "m2", "m3", None):
        requests.append(GenerationRequest(id=f"alone-{adapter}", prompt_token_ids=prompts()[1],
                                          params=SamplingParams(max_new_tokens=10),
                                          adapter=AdapterRef(adapter) if adapter else None))
    outcomes = run_requests(engine, requests, timeout=180)
    for rid, tokens in expected.items():
        r = outcomes[rid]
        assert isinstance(r, Completion), r
        assert list(r.token_ids) == tokens, rid
    merged = {tuple(outcomes[f"case{c}-1"].token_ids) for c in range(len(CASES))}
    alone = {tuple(outcomes[f"alone-{a}"].token_ids) for a in ("m1", "m2", "m3", None)}
    assert len(merged) >= len(CASES) - 1 and not merged & alone  # the merges really change the output
    assert engine.stats()["adapters"]["loads"] == len(CASES) + 3  # each merge built once for 3 rows


def test_unmergeable_adapters_fail_the_request_with_a_validation_error(make_engine, merge_setup):
    root, _ = merge_setup
    engine = make_engine("llama", adapter_root=str(root), adapter_slots=4, max_lora_rank=16)
    bad = GenerationRequest(id="bad", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=3),
                            adapter=AdapterRef.merged(MergedAdapters(("m1", "r4"), (1.0, 1.0))))
    good = GenerationRequest(id="good", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=3),
                             adapter=AdapterRef.merged(MergedAdapters(("m1", "m2"), (1.0, 1.0))))
    outcomes = run_requests(engine, [bad, good], timeout=60)
    failure = outcomes["bad"]
    assert isinstance(failure, GenerationFailure) and failure.error.type is ErrorType.VALIDATION
    assert "parameters.merged_adapters" in failure.error.message and "ranks" in failure.error.message
    assert isinstance(outcomes["good"], Completion)
