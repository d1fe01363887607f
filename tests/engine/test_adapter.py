"""PEFT adapter loading: exact parity with PEFT's own LoRA modules, and every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.adapter as adapter_module
from engine.adapter import AdapterWeights, load_peft_adapter
from engine.config import LORA_MODULES
from engine.lora_slots import LoraSlots
from engine.model_loader import ModelSpec
from engine.request import EngineError, ErrorType
from tests.builders import make_adapter, make_tiny_model, model_spec
from tests.engine.lora_reference import ATTN, make_spec, make_weights

KEY = "base_model.model.model.layers.{}.{}.{}.lora_{}.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, ModelSpec]:
    d = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", layers=3)
    return d, model_spec(d)


@pytest.fixture(scope="module")
def plain(model, tmp_path_factory) -> Path:
    """r=8 on q/v: the adapter the refusal cases edit."""
    return make_adapter(model[0], tmp_path_factory.mktemp("a") / "plain", r=8, alpha=16)


def edited(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of adapter `src` with config keys overridden and/or tensors replaced by tensors(dict)."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        st = dst / "adapter_model.safetensors"
        save_file(tensors(load_file(st)), st)
    return dst


def refused(path: Path, spec: ModelSpec, *words: str, max_rank=64, allow_pickle=False) -> EngineError:
    with pytest.raises(EngineError) as e:
        load_peft_adapter(path, spec, torch.float32, max_rank, allow_pickle)
    assert e.value.type == ErrorType.ADAPTER_INVALID and not e.value.retryable
    for w in words:
        assert w in e.value.message, (w, e.value.message)
    return e.value


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARITY = {
    "plain": dict(r=8, alpha=16),
    "rslora": dict(r=16, alpha=8, use_rslora=True, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "all_linear_rank1": dict(r=1, alpha=3, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj")),
    "patterns": dict(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"),
                     rank_pattern={"v_proj": 12, "model.layers.1.self_attn.q_proj": 2},
                     alpha_pattern={"down_proj": 32, r"layers\.2\.self_attn\.q_proj": 1}),
    "rslora_patterns": dict(r=8, alpha=16, use_rslora=True, targets=("q_proj", "o_proj", "up_proj"),
                            rank_pattern={"o_proj": 3}, alpha_pattern={"up_proj": 5}),
    "layers_to_transform": dict(r=6, alpha=12, targets=("q_proj", "gate_proj"), layers_to_transform=[0, 2]),
    "exclude_modules": dict(r=5, alpha=10, targets=("q_proj", "k_proj"),
                            exclude_modules=["model.layers.1.self_attn.k_proj"]),
    # saved configs edited afterwards (PEFT expands these when it loads them)
    "all_linear_string": dict(r=4, alpha=4, targets=ALL, config={"target_modules": "all-linear"}),
    "regex_string": dict(r=4, alpha=4, targets=("q_proj", "v_proj"),
                         config={"target_modules": r".*\.layers\.\d+\.self_attn\.(q|v)_proj"}),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_parity_with_peft(model, tmp_path, case):
    """Every module's delta x @ A @ B equals PEFT's lora_B(lora_A(x)) * scaling, and we wrap
    exactly the modules PEFT wraps."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, spec = model
    kwargs = dict(PARITY[case])
    targets = kwargs.pop("targets", ("q_proj", "v_proj"))
    config = kwargs.pop("config", None)
    path = make_adapter(model_dir, tmp_path / case, targets=targets, seed=len(case), **kwargs)
    if config is not None:
        path = edited(path, tmp_path / f"{case}_edited", config=config)
    w = load_peft_adapter(path, spec, torch.float32, 64, False, key="local:" + case)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), path)
    wrapped = {}
    for name, mod in peft.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            parts = name.split(".")
            wrapped[(int(parts[parts.index("layers") + 1]), parts[-1])] = mod
    assert set(wrapped) == set(w.modules)
    x = torch.randn(5, spec.hidden_size * 3)
    for (layer, name), mod in wrapped.items():
        xi = x[:, :spec.module_shapes[name][0]]
        want = mod.lora_B["default"](mod.lora_A["default"](xi)) * mod.scaling["default"]
        A, B = w.modules[(layer, name)]
        assert A.shape == (spec.module_shapes[name][0], mod.r["default"])
        torch.testing.assert_close(xi @ A @ B, want, rtol=1e-5, atol=1e-6)
    assert w.rank == max(m.r["default"] for m in wrapped.values())
    assert w.nbytes == sum(a.nbytes + b.nbytes for a, b in w.modules.values())
    assert w.key == "local:" + case


def test_compute_dtype(model, plain):
    w = load_peft_adapter(plain, model[1], torch.bfloat16, 64, False)
    for run in w.runs:  # the host tier holds copies in the compute dtype, the scale folded in
        assert run.A.dtype == run.B.dtype == torch.bfloat16 and run.A.is_contiguous() and run.B.is_contiguous()
        assert run.scale == 1.0


@pytest.mark.parametrize("config,words", [
    (dict(use_dora=True), ["use_dora"]),
    (dict(bias="lora_only"), ["bias"]),
    (dict(bias="all"), ["bias"]),
    (dict(lora_bias=True), ["lora_bias"]),
    (dict(modules_to_save=["lm_head"]), ["modules_to_save"]),
    (dict(target_parameters=["mlp.experts.gate_up_proj"]), ["target_parameters"]),
    (dict(fan_in_fan_out=True), ["fan_in_fan_out"]),
    (dict(peft_type="IA3"), ["peft_type"]),
    (dict(target_modules=["q_proj", "embed_tokens"]), ["target_modules", "embed_tokens"]),
    (dict(target_modules=["lm_head", "v_proj"]), ["target_modules", "lm_head"]),
    (dict(target_modules=".*(lm_head|q_proj)"), ["target_modules", "lm_head"]),
    (dict(target_modules=[]), ["target_modules"]),
    (dict(target_modules=["nothing_here"]), ["target_modules", "selects no module"]),
    (dict(r=4), ["shape", "rank", "r / rank_pattern"]),  # tensors say 8
    (dict(rank_pattern={"v_proj": 2}), ["rank"]),
    (dict(lora_alpha="16"), ["lora_alpha"]),
    (dict(layer_replication=[[0, 2]]), ["layer_replication"]),
    (dict(trainable_token_indices=[1, 2]), ["trainable_token_indices"]),
    (dict(layers_to_transform=[0]), ["unexpected tensor"]),  # file has layers 1, 2 too
    (dict(layers_to_transform="0"), ["layers_to_transform"]),
    (dict(target_modules="(q_proj"), ["target_modules", "regex"]),
    (dict(exclude_modules=[3]), ["exclude_modules"]),
    (dict(rank_pattern={"[": 4}), ["rank_pattern", "regex"]),
    (dict(target_modules=7), ["target_modules"]),
    (dict(alpha_pattern=[1]), ["alpha_pattern"]),
    (dict(target_modules=["q_proj", "v_proj", "k_proj"]), ["missing tensor", "k_proj"]),
])
def test_config_refusals(model, plain, tmp_path, config, words):
    refused(edited(plain, tmp_path / "a", config=config), model[1], *words)


def test_rank_above_max_refused(model, plain):
    refused(plain, model[1], "r / rank_pattern", "max_lora_rank", max_rank=4)


def test_real_dora_and_bias_adapters_refused(model, tmp_path):
    dora = make_adapter(model[0], tmp_path / "dora", use_dora=True)
    refused(dora, model[1], "use_dora")
    bias = make_adapter(model[0], tmp_path / "bias", lora_bias=True)
    refused(bias, model[1], "lora_bias")
    mts = make_adapter(model[0], tmp_path / "mts", modules_to_save=["lm_head"])
    refused(mts, model[1], "modules_to_save")
    emb = make_adapter(model[0], tmp_path / "emb", targets=("embed_tokens", "q_proj"))
    refused(emb, model[1], "embed_tokens")


def test_tensor_refusals(model, plain, tmp_path):
    spec = model[1]
    q0A = KEY.format(0, "self_attn", "q_proj", "A")
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    # missing tensor
    refused(edited(plain, tmp_path / "missing", tensors=lambda t: {k: v for k, v in t.items() if k != q0A}),
            spec, "missing tensor", q0A)
    cases = {  # name -> (tensors added or replaced, words of the refusal)
        "extra": ({KEY.format(0, "self_attn", "k_proj", "A"): torch.zeros(8, 64)},  # k_proj not targeted
                  ("unexpected tensor", "k_proj")),
        "odd": ({"base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": torch.zeros(8, 64)},
                ("unexpected tensor",)),  # a module we do not know
        "nan": ({q0A: torch.full((8, 64), float("nan"))}, ("non-finite", q0A)),
        "inf": ({q0A: torch.full((8, 64), float("inf"))}, ("non-finite",)),
        "wide": ({q0A: torch.zeros(8, 32)}, ("shape", "different base model")),  # another base model
        # DoRA magnitude vector / lora bias tensors slipped in without the config flags
        "mag": ({f"{q0}.lora_magnitude_vector": torch.ones(64)}, ("use_dora",)),
        "lbias": ({f"{q0}.lora_B.bias": torch.ones(64)}, ("lora_bias",)),
        "head": ({"base_model.model.lm_head.lora_A.weight": torch.ones(8, 64)}, ("lm_head",)),
    }
    for name, (extra, words) in cases.items():
        refused(edited(plain, tmp_path / name, tensors=lambda t, extra=extra: {**t, **extra}), spec, *words)


def test_other_architecture_refused(model, tmp_path):
    """An adapter trained for a model with other widths, or more layers, is refused by shape."""
    other = make_tiny_model(tmp_path / "other", "qwen2", layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64)
    refused(make_adapter(other, tmp_path / "narrow"), model[1], "shape", "different base model")
    deep = make_tiny_model(tmp_path / "deep", "llama", layers=5)
    refused(make_adapter(deep, tmp_path / "deep_a"), model[1], "layer 3", "3 layers")


def test_files(model, plain, tmp_path):
    spec = model[1]
    d = edited(plain, tmp_path / "noconfig")
    (d / "adapter_config.json").unlink()
    refused(d, spec, "adapter_config.json missing")
    d = edited(plain, tmp_path / "badjson")
    (d / "adapter_config.json").write_text("{not json")
    refused(d, spec, "adapter_config.json", "JSON")
    d = edited(plain, tmp_path / "noweights")
    (d / "adapter_model.safetensors").unlink()
    refused(d, spec, "adapter_model.safetensors missing")
    d = edited(plain, tmp_path / "corrupt")
    (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    refused(d, spec, "unreadable")
    d = edited(plain, tmp_path / "truncated")
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    refused(d, spec, "unreadable")


def test_pickle_needs_opt_in(model, plain, tmp_path):
    spec = model[1]
    d = edited(plain, tmp_path / "bin")
    torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
    (d / "adapter_model.safetensors").unlink()
    refused(d, spec, "adapter_model.bin", "allow_pickle")
    got = load_peft_adapter(d, spec, torch.float32, 64, allow_pickle=True)
    want = load_peft_adapter(plain, spec, torch.float32, 64, allow_pickle=False)
    assert got.modules.keys() == want.modules.keys()
    for k in want.modules:
        assert torch.equal(got.modules[k][0], want.modules[k][0]) and torch.equal(got.modules[k][1], want.modules[k][1])
    # weights_only=True: a pickle that is not plain tensors is refused, never executed
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    refused(d, spec, "adapter_model.bin", "unreadable", allow_pickle=True)


# ---- the fast load path: same weights, same refusals ---------------------------------------------

def _with_dtypes(src: Path, dst: Path, dtype_of) -> Path:
    """A copy of adapter `src` whose tensors are stored in dtype_of(name)."""
    return edited(src, dst, tensors=lambda t: {k: v.to(dtype_of(k)) for k, v in t.items()})


@pytest.mark.parametrize("stored", ["float32", "bfloat16", "float16", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_are_the_files_transposed_and_scaled_bit_for_bit(model, plain, tmp_path, stored, dtype):
    """A = lora_A.T and B = scale * lora_B.T, the product taken in fp32 and then cast, whatever float
    dtypes the file stores (one dtype: one conversion of the whole buffer; mixed: tensor by tensor)."""
    def dtype_of(name: str) -> torch.dtype:
        if stored == "mixed":
            return torch.bfloat16 if ".lora_B." in name else torch.float32
        return getattr(torch, stored)

    path = _with_dtypes(plain, tmp_path / "a", dtype_of)
    w = load_peft_adapter(path, model[1], dtype, 64, False)
    stored_tensors = load_file(path / "adapter_model.safetensors")
    assert len(w.modules) == len(stored_tensors) // 2
    for (layer, name), (A, B) in w.modules.items():
        a = stored_tensors[KEY.format(layer, "self_attn", name, "A")]
        b = stored_tensors[KEY.format(layer, "self_attn", name, "B")]
        assert torch.equal(A, a.float().t().to(dtype)) and A.dtype == dtype
        assert torch.equal(B, (b.float().t() * 2.0).to(dtype)) and B.dtype == dtype  # alpha 16 / r 8


def _in_file_order(src: Path, dst: Path, order) -> Path:
    """A copy of adapter `src` whose safetensors data holds its tensors in order(names), not name order."""
    shutil.copytree(src, dst)
    st = dst / "adapter_model.safetensors"
    tensors = load_file(st)
    header, chunks, at = {}, [], 0
    for name in order(sorted(tensors)):
        raw = tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [at, at + len(raw)]}
        chunks.append(raw)
        at += len(raw)
    st.write_bytes(_raw_safetensors(header, b"".join(chunks)))
    return dst


def test_an_fp32_file_is_loaded_as_views_of_its_one_buffer_in_any_tensor_order(tmp_path):
    """No copy of an fp32 file's data: every run is a view of one buffer as large as the data. Layers in
    name order (layer 10 after layer 1), reversed, or A and B apart, load the same weights, and a
    slot holds them the same."""
    spec = make_spec(layers=12)
    plain = make_adapter(spec, tmp_path / "plain", r=4, alpha=8, targets=("q_proj", "o_proj", "down_proj"))
    layouts = {"name order": plain,
               "reversed": _in_file_order(plain, tmp_path / "reversed", lambda names: names[::-1]),
               "A then B": _in_file_order(plain, tmp_path / "ab", lambda names: sorted(names, key=lambda n: n[-8:]))}
    loaded = {how: load_peft_adapter(path, spec, torch.float32, 16, False) for how, path in layouts.items()}
    want = loaded.pop("name order")
    data_len = sum(t.nbytes for t in load_file(plain / "adapter_model.safetensors").values())
    for w in [want, *loaded.values()]:
        storages = {t.untyped_storage().data_ptr() for run in w.runs for t in (run.A, run.B)}
        assert len(storages) == 1 and w.runs[0].A.untyped_storage().nbytes() == data_len == w.nbytes
    assert [(r.module, r.layers) for r in want.runs if r.module == "q_proj"] == [
        ("q_proj", slice(0, 2)), ("q_proj", slice(10, 12)), ("q_proj", slice(2, 10))]
    slots = LoraSlots(spec, 2, 16, "cpu", torch.float32)
    slots.load(0, want)
    for how, w in loaded.items():
        assert w.modules.keys() == want.modules.keys(), how
        for key, (A, B) in want.modules.items():
            assert torch.equal(w.modules[key][0], A) and torch.equal(w.modules[key][1], B), (how, key)
        slots.load(1, w)
        for m in slots.A:
            assert torch.equal(slots.A[m][:, 1], slots.A[m][:, 0]) and torch.equal(slots.B[m][:, 1], slots.B[m][:, 0])


def _raw_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def test_malformed_safetensors_refused(model, plain, tmp_path):
    """The header is parsed here, not by the safetensors library: whatever it would refuse is refused."""
    spec = model[1]
    tensors = load_file(plain / "adapter_model.safetensors")
    names = sorted(tensors)
    data = b"".join(tensors[n].numpy().tobytes() for n in names)
    good, offset = {}, 0
    for n in names:
        size = tensors[n].numel() * 4
        good[n] = {"dtype": "F32", "shape": list(tensors[n].shape), "data_offsets": [offset, offset + size]}
        offset += size
    first, second = names[0], names[1]

    def variant(name: str, entry_of=None, header=None, data=data) -> Path:
        d = edited(plain, tmp_path / name)
        h = header if header is not None else {k: (entry_of(k, dict(e)) if entry_of else e) for k, e in good.items()}
        (d / "adapter_model.safetensors").write_bytes(_raw_safetensors(h, data))
        return d

    assert load_peft_adapter(variant("same"), spec, torch.float32, 64, False).modules  # the layout itself loads
    size = good[first]["data_offsets"][1]
    for name, entry_of, header, body in [
        ("overlap", lambda k, e: {**e, "data_offsets": [0, size]} if k == second else e, None, data),
        ("gap", lambda k, e: e if k == first else {**e, "data_offsets": [o + 4 for o in e["data_offsets"]]},
         None, data[:size] + b"\0" * 4 + data[size:]),
        ("trailing", None, None, data + b"\0" * 8),
        ("short", None, None, data[:-4]),
        ("dtype", lambda k, e: {**e, "dtype": "F33"} if k == first else e, None, data),
        ("sized", lambda k, e: {**e, "shape": [e["shape"][0], e["shape"][1] + 1]} if k == first else e, None, data),
        ("offsets", lambda k, e: {**e, "data_offsets": "0-4"} if k == first else e, None, data),
        ("list", None, [1, 2], data),
    ]:
        refused(variant(name, entry_of, header, body), spec, "unreadable")
    d = edited(plain, tmp_path / "long")
    (d / "adapter_model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    refused(d, spec, "unreadable")
    d = edited(plain, tmp_path / "ints", tensors=lambda t: {k: v.to(torch.int32) if k == first else v
                                                            for k, v in t.items()})
    refused(d, spec, "non-float", first)


def test_a_header_seen_before_is_parsed_once_and_each_file_still_decides(model, plain, tmp_path, monkeypatch):
    """Files that share a header byte for byte (adapters saved alike) parse it once; each file's
    own data still gives its weights, and its own non-finite values or length still refuse it."""
    spec = model[1]
    parsed = []
    monkeypatch.setattr(adapter_module, "_headers", {})
    monkeypatch.setattr(adapter_module, "_header_entries",
                        lambda header, n, real=adapter_module._header_entries: parsed.append(n) or real(header, n))
    first = sorted(load_file(plain / "adapter_model.safetensors"))[0]
    tripled = edited(plain, tmp_path / "tripled", tensors=lambda t: {k: v * 3 for k, v in t.items()})
    doubled = edited(plain, tmp_path / "doubled", tensors=lambda t: {k: v * 2 for k, v in t.items()})
    nan = edited(plain, tmp_path / "nan", tensors=lambda t: {k: v.clone().fill_(float("nan")) if k == first else v
                                                             for k, v in t.items()})
    base = load_peft_adapter(plain, spec, torch.float32, 64, False).modules
    w3 = load_peft_adapter(tripled, spec, torch.float32, 64, False).modules
    parsed.clear()
    w2 = load_peft_adapter(doubled, spec, torch.float32, 64, False).modules
    refused(nan, spec, "non-finite", first)
    assert parsed == []  # the copies share tripled's header
    for key, (A, B) in base.items():
        assert torch.equal(w3[key][0], A * 3) and torch.equal(w2[key][0], A * 2)
        assert torch.equal(w3[key][1], B * 3) and torch.equal(w2[key][1], B * 2)
    st = doubled / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:-4])  # the same header over a shorter data section: parsed, refused
    refused(doubled, spec, "unreadable")
    assert len(parsed) == 1


def test_rank_pattern_order_decides_as_in_peft(model, tmp_path):
    """PEFT takes the first pattern that matches: configs that differ only in pattern order resolve
    differently, so the resolution cached for one is never used for the other."""
    spec = model[1]
    path = make_adapter(spec, tmp_path / "a", r=4, alpha=8)
    first_q = {"q_proj": 4, r"layers\.0\.self_attn\.q_proj": 2}
    w = load_peft_adapter(edited(path, tmp_path / "q_first", config={"rank_pattern": first_q}),
                          spec, torch.float32, 64, False)
    assert w.modules[(0, "q_proj")][0].shape == (spec.module_shapes["q_proj"][0], 4)
    layer0_first = dict(reversed(first_q.items()))
    refused(edited(path, tmp_path / "layer0_first", config={"rank_pattern": layer0_first}), spec,
            "layers.0.self_attn.q_proj.lora_A", "rank")


def test_layer_runs_split_where_layers_or_ranks_change():
    """One LayerRun per run of consecutive layers of a module with one rank; `modules` gives the
    per-layer pairs back."""
    spec = make_spec(layers=4)
    pairs = {**make_weights(spec, 4, ("q_proj",), seed=1, layers=[0, 1, 3]).modules,
             **make_weights(spec, 2, ("v_proj",), seed=2, layers=[0, 1]).modules,
             **make_weights(spec, 6, ("v_proj",), seed=3, layers=[2, 3]).modules}
    w = AdapterWeights.from_modules("k", pairs)
    assert [(run.module, run.layers, run.rank) for run in w.runs] == [
        ("q_proj", slice(0, 2), 4), ("q_proj", slice(3, 4), 4), ("v_proj", slice(0, 2), 2), ("v_proj", slice(2, 4), 6)]
    assert w.modules.keys() == pairs.keys() and w.rank == 6
    assert all(torch.equal(w.modules[k][i], pairs[k][i]) for k in pairs for i in (0, 1))
    assert w.nbytes == sum(a.nbytes + b.nbytes for a, b in pairs.values())


def test_slot_reloads_hold_exactly_the_new_adapter():
    """A slot reloaded with an adapter of lower rank, fewer layers or other modules reads as if it had
    been zeroed first: LoraSlots zeroes only what the previous adapter may have left."""
    spec = make_spec(layers=3)
    slots = LoraSlots(spec, 2, 16, "cpu", torch.float32)
    sequence = [make_weights(spec, 12, LORA_MODULES, seed=1), make_weights(spec, 4, ("q_proj",), seed=2, layers=[0, 2]),
                make_weights(spec, 4, ("q_proj",), seed=3), make_weights(spec, 8, ("v_proj", "down_proj"), seed=4),
                make_weights(spec, 8, ("v_proj", "down_proj"), seed=5), make_weights(spec, 1, ATTN, seed=6)]
    for w in sequence:
        slots.load(1, w)
        for module in slots.A:
            want_a, want_b = torch.zeros_like(slots.A[module][:, 1]), torch.zeros_like(slots.B[module][:, 1])
            for (layer, name), (a, b) in w.modules.items():
                if name == module:
                    want_a[layer, :a.shape[1]], want_b[layer, :, :b.shape[0]] = a.T, b.T
            assert torch.equal(slots.A[module][:, 1], want_a) and torch.equal(slots.B[module][:, 1], want_b)
        assert slots.ranks[1] == w.rank and not slots.A["q_proj"][:, 0].any()  # the other slot untouched
