"""SGMV LoRA kernels in Triton (after punica's shrink / expand): the `--lora-backend triton` op.

Two kernels read the LoraSlots tensors in place, so no adapter weight is ever copied per row or
per batch. A step's segments are cut into tiles of at most BLOCK_M rows of one segment; the tile
table [tiles, 4] int32 holds (first row, rows, slot, rank) and is built on the host in `plan`.

    shrink, one launch per module group sharing x (q/k/v, gate/up); grid (tile, rank block x part, g):
        s[part, g, rows, r0:r0+BLOCK_R] = x[rows, ks] @ A_g[layer, slot, ks, r0:r0+BLOCK_R]
        x [T, in], A_g[layer] [S, in, R], s [parts, G, T, R_batch] fp32; ks: the part's chunk of
        the input features; rank blocks past the slot's rank exit at once
    expand, one launch per module; grid (tile, out block):
        y[rows, n0:n0+BLOCK_N] += sum_part(s[part, j, rows, :rank]) @ B_j[layer, slot, :rank, n0:n0+BLOCK_N]
        B_j[layer] [S, R, out], y [T, out]; the loop over the rank stops at the slot's own rank

Each segment does the work of its own rank (mixed ranks are not padded to the largest), and the
shrink of q/k/v is one launch whose result the three expands read. A decode step has few tiles, so
the shrink splits its long reduction over the input features into parts that run in parallel;
the expand adds the parts up (no atomics: the result does not depend on scheduling). Products run
in the weights' dtype (bf16 / fp16 on tensor cores, fp32 in IEEE precision), accumulated in fp32.

On CPU tensors the kernels run only under Triton's interpreter, which CI uses: set
TRITON_INTERPRET=1 before this module is imported (the kernels are built at import).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from engine.lora_op import LoraBatch, LoraOp
from engine.lora_slots import LoraSlots

BLOCK_K = 64  # shrink: input features per step of its reduction loop
BLOCK_R = 16  # rank columns per block (the smallest dot size)
BLOCK_N = 64  # expand: output features per program
SHRINK_PROGRAMS = 512  # split the shrink's reduction until about this many programs run (a few per SM)
MAX_PARTS = 16


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, s_ptr, tiles_ptr, in_features, parts, k_chunk,
    stride_xm, stride_xk,  # x [T, in]
    stride_as, stride_ak, stride_ar,  # A_g[layer] [S, in, R], the same for every g of a group
    stride_sp, stride_sg, stride_sm, stride_sr,  # s [parts, G, T, R_batch]
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    tile, g = tl.program_id(0), tl.program_id(2)
    r_block, part = tl.program_id(1) // parts, tl.program_id(1) % parts
    row0 = tl.load(tiles_ptr + tile * 4)
    rows = tl.load(tiles_ptr + tile * 4 + 1)
    slot = tl.load(tiles_ptr + tile * 4 + 2)
    rank = tl.load(tiles_ptr + tile * 4 + 3)
    r0 = r_block * BLOCK_R
    if r0 >= rank:
        return  # past this slot's rank: nothing to compute
    a_ptr = a0_ptr
    if g == 1:
        a_ptr = a1_ptr
    if g == 2:
        a_ptr = a2_ptr
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    m_mask = offs_m < rows
    r_mask = offs_r < rank
    x_rows = x_ptr + (row0 + offs_m).to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    a_cols = a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar  # [1, BLOCK_R]
    k_start = part * k_chunk
    k_end = tl.minimum(k_start + k_chunk, in_features)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):  # an empty part stores zeros
        k = k0 + offs_k
        k_mask = k < k_end
        a = tl.load(a_cols + k[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        x = x.to(a.dtype)  # the activations in the weights' dtype, as TorchLoraOp does
        if DOT_FP32:  # the interpreter multiplies bf16 wrongly; bf16 values are exact in fp32
            x, a = x.to(tl.float32), a.to(tl.float32)
        acc += tl.dot(x, a, input_precision=PRECISION)
    s = (s_ptr + part * stride_sp + g * stride_sg + (row0 + offs_m).to(tl.int64)[:, None] * stride_sm
         + offs_r[None, :] * stride_sr)
    tl.store(s, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(
    s_ptr, b_ptr, y_ptr, tiles_ptr, out_features, parts,
    stride_sp, stride_sm, stride_sr,  # s[:, j] [parts, T, R_batch] fp32
    stride_bs, stride_br, stride_bn,  # B_j[layer] [S, R, out]
    stride_ym, stride_yn,  # y [T, out]
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    tile, n_block = tl.program_id(0), tl.program_id(1)
    row0 = tl.load(tiles_ptr + tile * 4)
    rows = tl.load(tiles_ptr + tile * 4 + 1)
    slot = tl.load(tiles_ptr + tile * 4 + 2)
    rank = tl.load(tiles_ptr + tile * 4 + 3)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < rows
    n_mask = offs_n < out_features
    s_rows = s_ptr + (row0 + offs_m).to(tl.int64)[:, None] * stride_sm  # [BLOCK_M, 1]
    b_cols = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn  # [1, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # this slot's own rank
        r = r0 + offs_r
        r_mask = r < rank
        b = tl.load(b_cols + r[:, None] * stride_br, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for part in range(0, parts):
            s += tl.load(s_rows + part * stride_sp + r[None, :] * stride_sr,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        s = s.to(b.dtype)
        if DOT_FP32:
            s, b = s.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(s, b, input_precision=PRECISION)
    y = y_ptr + (row0 + offs_m).to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    old = tl.load(y, mask=mask)
    tl.store(y, (old.to(tl.float32) + acc).to(old.dtype), mask=mask)


@dataclass(eq=False)
class _TritonPlan:
    """TritonLoraOp's per-step data."""

    tiles: Tensor  # [n, 4] int32 on the device: (first row, rows, slot, rank) of each tile
    num_tiles: int
    block_m: int  # rows per tile
    rank_blocks: int  # BLOCK_R blocks of the largest rank in the batch
    parts: int  # the shrink's reduction split in this many parts
    shrunk: Tensor  # s [parts, G, T, R_batch] fp32: the last shrink's partial sums
    shrink_key: tuple | None = None  # identity of the x (and layer, group) `shrunk` was computed from
    shrink_x: Tensor | None = None  # that x: holding it keeps its storage (and data_ptr) ours


class TritonLoraOp(LoraOp):
    """The LoraOp seam on the SGMV kernels above. `apply` on the first module of a group runs the
    group's shrink; the group's other modules reuse it while they are given the same x."""

    def __init__(self, slots: LoraSlots) -> None:
        if slots.device.type != "cuda" and not interpreting():
            raise ValueError("lora_backend triton needs a CUDA device (or TRITON_INTERPRET=1, for tests)")
        super().__init__(slots)
        # fp32 products in IEEE precision (not TF32): the fp32 path is the exact one
        self._precision = "ieee" if slots.dtype == torch.float32 else None
        self._dot_fp32 = interpreting()

    def plan(self, batch: LoraBatch) -> _TritonPlan:
        longest = max(seg.length for seg in batch.segments)
        block_m = 16 if longest <= 16 else 32 if longest <= 32 else 64  # decode rows need no 64-row tile
        tiles = [(start + m, min(block_m, length - m), slot, rank)
                 for start, length, slot, rank in batch.segments for m in range(0, length, block_m)]
        rank_blocks = triton.cdiv(batch.max_rank, BLOCK_R)
        chunks = min(triton.cdiv(self.slots.spec.module_shapes[m][0], BLOCK_K) for m in batch.groups)
        parts = max(1, min(MAX_PARTS, chunks, SHRINK_PROGRAMS // (len(tiles) * rank_blocks)))
        widest = max(len(group) for group in batch.groups.values())
        device = self.slots.device
        return _TritonPlan(
            tiles=torch.tensor(tiles, dtype=torch.int32).to(device, non_blocking=True),
            num_tiles=len(tiles), block_m=block_m, rank_blocks=rank_blocks, parts=parts,
            shrunk=torch.empty(parts, widest, batch.num_tokens, batch.max_rank, dtype=torch.float32, device=device),
        )

    def apply(self, y: Tensor, x: Tensor, layer: int, module: str, batch: LoraBatch) -> None:
        group = batch.groups.get(module)
        plan: _TritonPlan | None = batch.plan
        if group is None or plan is None:
            return  # no loaded adapter targets this module, or no row has an adapter
        # The same x (storage, layout, and version outside inference mode) as the last shrink
        # of this layer's group: reuse it (see LoraOp's contract).
        x_key = (layer, group, x.data_ptr(), x.shape, x.stride(), 0 if x.is_inference() else x._version)
        s = plan.shrunk
        if plan.shrink_key != x_key:
            self._shrink(x, layer, group, plan)
            plan.shrink_key, plan.shrink_x = x_key, x
        b = self.slots.B[module][layer].transpose(1, 2)  # [S, R, out] view
        s_j = s[:, group.index(module)]  # [parts, T, R_batch]
        _expand_kernel[(plan.num_tiles, triton.cdiv(y.shape[1], BLOCK_N))](
            s_j, b, y, plan.tiles, y.shape[1], plan.parts,
            *s_j.stride(), *b.stride(), *y.stride(),
            BLOCK_M=plan.block_m, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
            DOT_FP32=self._dot_fp32, PRECISION=self._precision,
        )

    def _shrink(self, x: Tensor, layer: int, group: tuple[str, ...], plan: _TritonPlan) -> None:
        """plan.shrunk[:, g] = the parts of x @ A_g for every module g of the group."""
        a = [self.slots.A[m][layer].transpose(1, 2) for m in group]  # [S, in, R] views
        a += [a[0]] * (3 - len(a))  # unused pointer arguments
        in_features = x.shape[1]
        k_chunk = triton.cdiv(triton.cdiv(in_features, plan.parts), BLOCK_K) * BLOCK_K
        s = plan.shrunk
        _shrink_kernel[(plan.num_tiles, plan.rank_blocks * plan.parts, len(group))](
            x, a[0], a[1], a[2], s, plan.tiles, in_features, plan.parts, k_chunk,
            *x.stride(), *a[0].stride(), *s.stride(),
            BLOCK_M=plan.block_m, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R,
            DOT_FP32=self._dot_fp32, PRECISION=self._precision,
        )
