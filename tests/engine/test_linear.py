"""engine.model_runner.Linear: y = x W^T + b on oneDNN-packed weights against a plain fp32 loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model_runner import Linear, can_pack

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32), reason="torch without oneDNN")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[t, o] = sum_i x[t, i] * W[o, i] + b[o], one row at a time in float64."""
    rows = [(weight.double() @ row.double()) + (0 if bias is None else bias.double()) for row in x]
    return torch.stack(rows).float()


@pytest.mark.parametrize("rows", [1, 7, 32, 33, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_a_plain_loop(rows: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 80, generator=gen)  # [out, in]
    bias = torch.randn(96, generator=gen) if with_bias else None
    x = torch.randn(2 * rows, 80, generator=gen)[::2]  # [rows, in], strided as a row slice can be
    packed = Linear(weight, bias, packed=True, batch_hint=32)
    plain = Linear(weight, bias, packed=False, batch_hint=32)
    want = reference(x, weight, bias)
    torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(plain(x), F.linear(x, weight, bias))  # unpacked: the HF weight as it is
    assert packed.out_features == plain.out_features == 96


def test_packing_is_for_cpu_fp32_only() -> None:
    assert not can_pack(torch.device("cpu"), torch.bfloat16)
    assert not can_pack(torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("biases", [(True, True), (True, False), (False, False)])
def test_stacked_projections_are_each_modules_linear(biases: tuple[bool, bool]) -> None:
    """q/k/v (or gate/up) as one packed GEMM: each column block is its module's x W^T + b against a
    plain loop, with a zero bias where a module has none."""
    from engine.model_runner import _stack

    gen = torch.Generator().manual_seed(5)
    modules = [torch.nn.Linear(80, out, bias=b) for out, b in zip((96, 32), biases, strict=True)]
    for m in modules:
        m.weight.data = torch.randn(m.weight.shape, generator=gen)
    x = torch.randn(13, 80, generator=gen)
    stacked = _stack(modules, batch_hint=32)
    assert stacked.out_features == 128
    for m, y in zip(modules, stacked(x).split([96, 32], dim=-1), strict=True):
        torch.testing.assert_close(y, reference(x, m.weight.data, None if m.bias is None else m.bias.data),
                                   rtol=1e-5, atol=1e-4)


def test_a_packed_runner_stacks_qkv_and_gate_up_and_gives_the_unpacked_logits(loaded_models) -> None:
    """Qwen2 (q/k/v with biases, o without): packed and stacked, the logits of plain F.linear."""
    from engine.kv_cache import BlockManager, KVCache
    from engine.model_runner import STACKS, ModelRunner
    from engine.request import GenerationRequest
    from engine.sequence import Sequence

    model = loaded_models("qwen2")
    cfg = model.hf_model.config
    logits = []
    for packed in (True, False):
        cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                        4, 1 << 20, model.device, model.dtype)
        runner = ModelRunner(model, cache, pack_weights=packed)
        assert set(runner.layers[0].stacked) == (set(STACKS) if packed else set())
        assert set(runner.layers[0].linear) == ({"o_proj", "down_proj"} if packed else set(runner.out_features))
        blocks = BlockManager(cache.num_blocks, 4)
        seqs = [Sequence(GenerationRequest(id=str(i), prompt_token_ids=ids), list(ids), len(ids))
                for i, ids in enumerate(([5, 9, 11, 40, 7], [3, 3, 8]))]
        for seq in seqs:
            blocks.allocate(seq)
        out = [runner.run(seqs)]
        for seq, row in zip(seqs, out[0], strict=True):
            seq.token_ids.append(int(row.argmax()))
            blocks.append(seq)
        out.append(runner.run(seqs))  # a decode step
        logits.append(torch.cat(out))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)
