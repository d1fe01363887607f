"""The Triton SGMV op against the fp32 reference loop: layouts, ranks 1..64, tile boundaries, dtypes,
the shared shrink of q/k/v. On CUDA the kernels are compiled; without CUDA they run in Triton's
interpreter (slow: the grid is kept small)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are built (at import)
triton = pytest.importorskip("triton")

from engine.config import LORA_MODULES  # noqa: E402
from engine.lora_op import TorchLoraOp, build_lora_op  # noqa: E402
from engine.lora_slots import LoraSlots  # noqa: E402
from engine.lora_triton import TritonLoraOp, interpreting  # noqa: E402
from tests.engine.lora_reference import (  # noqa: E402
    LAYOUTS,
    filled_slots,
    make_spec,
    make_weights,
    reference_lora,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}  # relative to the largest value
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def check(op, slots, seg_lens, seg_slots, modules=LORA_MODULES, layer=1, x_dtype=None, seed=0) -> None:
    """Apply every module of one layer to random x / y and compare with y + reference; rows of slot
    -1 must stay bit-identical."""
    spec, dtype = slots.spec, slots.dtype
    g = torch.Generator().manual_seed(seed)
    T = sum(seg_lens)
    base = torch.tensor([s < 0 for n, s in zip(seg_lens, seg_slots, strict=True) for _ in range(n)], dtype=torch.bool)
    batch = op.prepare(seg_lens, seg_slots)
    x_hidden = torch.randn(T, spec.hidden_size, generator=g).to(x_dtype or dtype)
    for module in modules:
        fan_in, fan_out = spec.module_shapes[module]
        x = x_hidden if fan_in == spec.hidden_size else torch.randn(T, fan_in, generator=g).to(x_dtype or dtype)
        y0 = torch.randn(T, fan_out, generator=g).to(dtype)
        y = y0.to(DEVICE, copy=True)
        op.apply(y, x.to(DEVICE), layer, module, batch)
        y = y.cpu()
        expect = y0.float() + reference_lora(x.to(dtype), slots, layer, module, seg_lens, seg_slots)
        tol = TOL[dtype] * max(1.0, expect.abs().max().item())
        assert (y.float() - expect).abs().max() <= tol, module
        assert torch.equal(y[base], y0[base]), f"{module}: base-only rows changed"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_fp32(layout):
    """Every packing: decode rows, prefill, a long prompt beside decode rows, gaps of base rows,
    empty segments, base only; all seven modules (q/k/v and gate/up share their shrinks)."""
    slots = filled_slots(make_spec(), torch.float32, DEVICE)
    check(TritonLoraOp(slots), slots, *LAYOUTS[layout])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["decode_distinct", "mixed", "empty_segments"])
def test_layouts_half(dtype, layout):
    slots = filled_slots(make_spec(), dtype, DEVICE)
    check(TritonLoraOp(slots), slots, *LAYOUTS[layout], modules=("q_proj", "k_proj", "v_proj", "down_proj"))


def test_every_rank_reads_only_its_own():
    """Ranks 1..64 side by side in one batch: each segment loops over its own rank (the shrink's
    rank blocks past it exit), so what lies past it in the slot is never read."""
    ranks = [1, 2, 15, 16, 17, 31, 33, 48, 63, 64]
    n = len(ranks)
    spec = make_spec(layers=1)
    slots = LoraSlots(spec, n, 64, DEVICE, torch.float32)
    for slot, r in enumerate(ranks):
        slots.load(slot, make_weights(spec, r, ("q_proj", "v_proj"), seed=slot))
    op = TritonLoraOp(slots)
    check(op, slots, [1] * n, list(range(n)), modules=("q_proj", "v_proj"), layer=0)  # decode
    check(op, slots, [3, 1, 18, 2, 5, 1, 1, 7, 2, 4], list(range(n)), modules=("q_proj",), layer=0)  # prefill

    x = torch.randn(n, 64, device=DEVICE)
    before = torch.zeros(n, 64, device=DEVICE)
    op.apply(before, x, 0, "q_proj", op.prepare([1] * n, list(range(n))))
    for slot, r in enumerate(ranks):  # poison the padding: a read past the rank would give NaN
        slots.A["q_proj"][0, slot, r:] = float("nan")
        slots.B["q_proj"][0, slot, :, r:] = float("nan")
    after = torch.zeros(n, 64, device=DEVICE)
    op.apply(after, x, 0, "q_proj", op.prepare([1] * n, list(range(n))))
    assert torch.equal(after, before)


@pytest.mark.parametrize("length", [1, 16, 17, 33, 64, 65, 130])
def test_one_row_to_many(length):
    """One segment of `length` rows between base rows, across the 16 / 32 / 64-row tiles."""
    spec = make_spec(layers=1)
    slots = LoraSlots(spec, 2, 16, DEVICE, torch.float32)
    slots.load(1, make_weights(spec, 16, ("q_proj",), seed=3))
    check(TritonLoraOp(slots), slots, [2, length, 3], [-1, 1, -1], modules=("q_proj",), layer=0)


@pytest.mark.parametrize("max_parts", [1, 3, 4, 16])
def test_split_reduction(monkeypatch, max_parts):
    """The shrink's reduction over 300 input features split in parts (64-feature chunks, the last
    one partial, an empty part when 4 parts of 128 cover it in 3): the expand adds the parts up."""
    import engine.lora_triton as lora_triton

    monkeypatch.setattr(lora_triton, "MAX_PARTS", max_parts)
    spec = make_spec(layers=1, hidden=300, kv=40, inter=300)
    slots = LoraSlots(spec, 3, 32, DEVICE, torch.float32)
    for slot, r in enumerate((32, 5, 17)):
        slots.load(slot, make_weights(spec, r, ("q_proj", "v_proj", "down_proj"), seed=slot))
    op = TritonLoraOp(slots)
    assert op.prepare([1, 1, 1], [0, 1, 2]).plan.parts == min(max_parts, 5)
    check(op, slots, [1, 2, 1, 1], [0, -1, 1, 2], modules=("q_proj", "v_proj", "down_proj"), layer=0)


def test_strided_outputs_fp32_input_and_shared_shrink():
    """q/k/v written into column views of one [T, q+k+v] tensor (as a fused projection would give),
    x in fp32 against bf16 slots; the q/k/v shrink runs once for one x, again for another x or
    after x changed in place."""
    spec = make_spec()
    slots = filled_slots(spec, torch.bfloat16, DEVICE)
    op = TritonLoraOp(slots)
    seg_lens, seg_slots = [2, 1, 3, 1], [0, -1, 3, 1]
    batch = op.prepare(seg_lens, seg_slots)
    x = torch.randn(7, 64, device=DEVICE)
    qkv = torch.zeros(7, 128, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = qkv[:, :64], qkv[:, 64:96], qkv[:, 96:]
    op.apply(q, x, 0, "q_proj", batch)
    key = batch.plan.shrink_key
    op.apply(k, x, 0, "k_proj", batch)
    assert batch.plan.shrink_key is key, "k reused q's shrink"
    x2 = torch.randn(7, 64, device=DEVICE)
    op.apply(v, x2, 0, "v_proj", batch)
    assert batch.plan.shrink_key is not key, "another x: a new shrink"
    for out, xm, module in ((q, x, "q_proj"), (k, x, "k_proj"), (v, x2, "v_proj")):
        ref = reference_lora(xm.bfloat16(), slots, 0, module, seg_lens, seg_slots)
        torch.testing.assert_close(out.float().cpu(), ref, rtol=0, atol=3e-2 * ref.abs().max().item())


def test_slot_reload_is_read_in_place():
    """No weight is cached between steps: a reloaded slot is read as it is now."""
    spec = make_spec(layers=1)
    slots = LoraSlots(spec, 2, 16, DEVICE, torch.float32)
    slots.load(0, make_weights(spec, 8, ("q_proj",), seed=1))
    op = TritonLoraOp(slots)
    check(op, slots, [1, 1], [0, -1], modules=("q_proj",), layer=0)
    slots.load(0, make_weights(spec, 16, ("q_proj",), seed=2))
    check(op, slots, [1, 1], [0, -1], modules=("q_proj",), layer=0)


def test_no_adapter_and_untargeted_module_are_no_ops():
    spec = make_spec(layers=1)
    slots = LoraSlots(spec, 2, 8, DEVICE, torch.float32)
    slots.load(0, make_weights(spec, 8, ("q_proj",)))
    op = build_lora_op("triton", slots)
    assert isinstance(op, TritonLoraOp)
    y = torch.zeros(3, 96, device=DEVICE)
    op.apply(y, torch.randn(3, 64, device=DEVICE), 0, "gate_proj", op.prepare([3], [0]))  # no adapter targets it
    assert not op.prepare([2, 1], [-1, 1]).active  # slot 1 is empty
    assert y.abs().sum() == 0


RUNNER_ADAPTERS = {"qv_r1": dict(r=1, targets=("q_proj", "v_proj")),
                   "all_r16": dict(r=16, targets=LORA_MODULES),
                   "attn_r8": dict(r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"))}


@pytest.mark.skipif(DEVICE == "cuda", reason="the tiny models load on the CPU; gpu_check runs the engine on CUDA")
def test_model_runner_with_triton_matches_torch_op(tiny_model_dirs, loaded_models, tmp_path):
    """The runner's prefill and decode steps, every adapter and base rows in one batch: logits
    with the Triton op equal those with the torch op, as the runner calls them (q/k/v on one x)."""
    from engine.adapter import load_peft_adapter
    from engine.kv_cache import BlockManager, KVCache
    from engine.model_runner import ModelRunner
    from engine.request import GenerationRequest
    from engine.sequence import Sequence
    from tests.builders import make_adapter

    model = loaded_models("llama")
    slots = LoraSlots(model.spec, len(RUNNER_ADAPTERS), 16, model.device, model.dtype)
    for slot, (name, kw) in enumerate(RUNNER_ADAPTERS.items()):
        path = make_adapter(tiny_model_dirs["llama"], tmp_path / name, seed=slot, scale=0.15, **kw)
        slots.load(slot, load_peft_adapter(path, model.spec, model.dtype, 16, False))
    rows = [(0, 5), (-1, 7), (1, 3), (2, 9), (1, 4)]  # (slot, prompt length)

    def steps(op) -> list[torch.Tensor]:
        cfg = model.hf_model.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, 4, 1 << 20, model.device,
                        model.dtype)
        blocks = BlockManager(cache.num_blocks, 4)
        runner = ModelRunner(model, cache, op)
        seqs = []
        for i, (slot, n) in enumerate(rows):
            ids = [3 + (7 * i + j) % 250 for j in range(n)]
            seq = Sequence(GenerationRequest(id=str(i), prompt_token_ids=ids), list(ids), n)
            seq.adapter_slot = slot
            blocks.allocate(seq)
            seqs.append(seq)
        logits = [runner.run(seqs)]
        for step in range(2):
            for seq in seqs:
                seq.token_ids.append(10 + step)
                blocks.append(seq)
            logits.append(runner.run(seqs))
        return logits

    for torch_logits, triton_logits in zip(steps(TorchLoraOp(slots)), steps(TritonLoraOp(slots)), strict=True):
        torch.testing.assert_close(triton_logits, torch_logits, atol=1e-4, rtol=0)


@pytest.mark.skipif(not interpreting(), reason="CPU refusal only without CUDA")
def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        TritonLoraOp(LoraSlots(make_spec(), 2, 8, "cpu", torch.float32))


# ---- CUDA only (scripts/gpu_check.sh runs these on a GPU machine) ------------------------------

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend,expected", [("auto", TritonLoraOp), ("torch", TorchLoraOp)])
def test_auto_picks_triton_on_cuda(backend, expected):
    assert type(build_lora_op(backend, LoraSlots(make_spec(), 2, 8, "cuda", torch.bfloat16))) is expected


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_shapes_triton_agrees_with_torch_op(dtype):
    """Llama-3-8B projection shapes, 32 distinct rank-16 adapters on decode rows and a prompt beside
    them: the two backends agree."""
    hidden, kv, inter = 4096, 1024, 14336
    spec = make_spec(layers=1, hidden=hidden, kv=kv, inter=inter)
    slots = LoraSlots(spec, 32, 16, "cuda", dtype)
    for s in range(32):
        slots.load(s, make_weights(spec, 16, LORA_MODULES, seed=s, dtype=dtype, std=0.02))
    layouts = [([1] * 32, list(range(32))), ([100] + [1] * 31, list(range(32)))]
    for seg_lens, seg_slots in layouts:
        T = sum(seg_lens)
        for module in ("q_proj", "down_proj"):
            fan_in, fan_out = spec.module_shapes[module]
            x = torch.randn(T, fan_in, device="cuda", dtype=dtype)
            outs = []
            for op in (TorchLoraOp(slots), TritonLoraOp(slots)):
                y = torch.zeros(T, fan_out, device="cuda", dtype=dtype)
                op.apply(y, x, 0, module, op.prepare(seg_lens, seg_slots))
                outs.append(y.float())
            scale = outs[0].abs().max().item()
            torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-2 * scale)

