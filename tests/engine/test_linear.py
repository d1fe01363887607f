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
