"""One packed forward pass per step over the HF model's own weights, with a paged KV cache and a
batched LoRA op on every target projection.

A step is either a prefill (all tokens of several sequences concatenated, causal attention within
each sequence) or a decode (one token per row, attention over the row's paged context). Rows are
ordered so that rows with the same adapter slot are consecutive: that is the segment layout the
LoRA op (SGMV-style) reads. Logits are computed only for each sequence's last token: for SmolLM2
the vocabulary projection is 57 MFLOP per token against 212 for all 30 layers, so projecting every
prefill token would add ~27% to a prefill step (and [T, 49152] fp32 logits: 430 MB at T=2240).

We reuse the HF model's modules where they carry semantics (embedding, rotary embedding with its
rope scaling, final norm, lm_head, activation) and reference its Linear weights in place, never
copying them. Fusing q/k/v and gate/up into one GEMM each was measured (SmolLM2 shapes, 30 layers,
1 thread): 70 ms either way at 32 rows, 3.3 s either way at 2200 rows, so we do not fuse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import LORA_MODULES
from engine.kv_cache import KVCache
from engine.model_loader import LoadedModel

if TYPE_CHECKING:
    from engine.lora_op import LoraBatch, LoraOp
    from engine.sequence import Sequence


ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
SCORE_CHUNK = 256  # prompt tokens projected onto the vocabulary at once by run_scored


@dataclass
class _Layer:
    """References to one decoder layer's parameters: module -> (weight [out, in], bias [out] or None)."""

    input_norm: Tensor  # [hidden]
    post_norm: Tensor  # [hidden]
    linear: dict[str, tuple[Tensor, Tensor | None]]
    act: Callable[[Tensor], Tensor]
    window: int | None  # sliding window (keys with q_pos - k_pos < window are visible) or None
    k_cache: Tensor  # KV cache of this layer [num_blocks, block_size, kv_heads, head_dim]
    v_cache: Tensor


@dataclass
class StepInputs:
    """Per-step metadata, built once on the host and shared by every layer."""

    input_ids: Tensor  # [T] packed tokens, rows grouped by adapter slot
    positions: Tensor  # [T]
    slot_mapping: Tensor  # [T] flat cache slot receiving each token's K/V
    last_index: Tensor  # [B] packed row of each sequence's last token, in the caller's order
    lora: LoraBatch | None  # None when no row has an adapter
    # prefill: (start, end) of each sequence in the packed tokens, and its mask per window
    bounds: list[tuple[int, int]] | None = None
    prefill_masks: dict[int, list[Tensor | None]] | None = None  # window -> per sequence [n, n] or None (causal)
    # decode: the cache blocks of each row's whole context, and which of their positions it may see
    block_index: Tensor | None = None  # [B * max_blocks] cache blocks of each row, zero-padded
    decode_masks: dict[int | None, Tensor] | None = None  # window -> [B, 1, 1, max_blocks * block_size] bool


def _window(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or layer_types is None:
        return window
    return window if layer_types[layer_idx] == "sliding_attention" else None


class ModelRunner:
    def __init__(self, model: LoadedModel, kv_cache: KVCache, lora_op: LoraOp | None = None) -> None:
        hf = model.hf_model
        config = hf.config
        attn0 = hf.model.layers[0].self_attn
        self.device, self.dtype = model.device, model.dtype
        self.kv_cache = kv_cache
        self.lora_op = lora_op
        self.head_dim = attn0.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = attn0.scaling
        self.eps = config.rms_norm_eps
        self.embed = hf.model.embed_tokens
        self.rotary = hf.model.rotary_emb
        self.final_norm = hf.model.norm
        self.lm_head = hf.lm_head
        self.layers: list[_Layer] = []
        for i, layer in enumerate(hf.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            linears = {name: getattr(attn if name in ATTN_MODULES else mlp, name) for name in LORA_MODULES}
            self.layers.append(_Layer(
                input_norm=layer.input_layernorm.weight.data, post_norm=layer.post_attention_layernorm.weight.data,
                linear={name: (m.weight.data, _data(m.bias)) for name, m in linears.items()},
                act=mlp.act_fn, window=_window(config, i),
                k_cache=kv_cache.k[i], v_cache=kv_cache.v[i],
            ))
        self.windows = sorted({layer.window for layer in self.layers if layer.window is not None})

    # ---- step metadata -------------------------------------------------------------------------

    def _order(self, seqs: list[Sequence]) -> tuple[list[int], list[int], list[int]]:
        """Packing order (rows grouped by adapter slot, stable) and the LoRA segments: slot-group
        sizes in rows (multiplied by tokens per row by the caller) and each group's slot."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].adapter_slot)
        seg_rows: list[int] = []
        seg_slots: list[int] = []
        for i in order:
            slot = seqs[i].adapter_slot
            if seg_slots and seg_slots[-1] == slot:
                seg_rows[-1] += 1
            else:
                seg_rows.append(1)
                seg_slots.append(slot)
        return order, seg_rows, seg_slots

    def _lora_batch(self, seg_lens: list[int], seg_slots: list[int]) -> LoraBatch | None:
        if self.lora_op is None or all(s < 0 for s in seg_slots):
            return None
        return self.lora_op.prepare(seg_lens, seg_slots)

    def _tensor(self, data) -> Tensor:
        return torch.tensor(data, dtype=torch.long).to(self.device, non_blocking=True)

    def prepare_prefill(self, seqs: list[Sequence]) -> StepInputs:
        """All tokens of each sequence from position 0 (a preempted sequence recomputes its outputs too)."""
        bs = self.kv_cache.block_size
        order, _, seg_slots = self._order(seqs)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bounds: list[tuple[int, int]] = []
        seg_lens: list[int] = []
        last = [0] * len(seqs)
        prev_slot = None
        for i in order:
            seq = seqs[i]
            n = seq.num_tokens
            start = len(ids)
            ids.extend(seq.token_ids)
            positions.extend(range(n))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(n))
            bounds.append((start, start + n))
            last[i] = start + n - 1
            if prev_slot == seq.adapter_slot:
                seg_lens[-1] += n
            else:
                seg_lens.append(n)
            prev_slot = seq.adapter_slot
        masks: dict[int, list[Tensor | None]] = {}
        for w in self.windows:
            masks[w] = [None if e - s <= w else _sliding_causal(e - s, w, self.device) for s, e in bounds]
        return StepInputs(
            input_ids=self._tensor(ids), positions=self._tensor(positions), slot_mapping=self._tensor(slots),
            last_index=self._tensor(last), lora=self._lora_batch(seg_lens, seg_slots),
            bounds=bounds, prefill_masks=masks,
        )

    def prepare_decode(self, seqs: list[Sequence]) -> StepInputs:
        """One token per row: the newest token (its K/V not yet cached) at position num_tokens - 1."""
        bs = self.kv_cache.block_size
        order, seg_rows, seg_slots = self._order(seqs)
        packed = [seqs[i] for i in order]
        lens = [s.num_tokens for s in packed]
        ctx = max(lens)
        max_blocks = -(-ctx // bs)
        tables = [s.block_table[:max_blocks] + [0] * (max_blocks - len(s.block_table)) for s in packed]
        last = [0] * len(seqs)
        for row, i in enumerate(order):
            last[i] = row
        slots = [s.block_table[(n - 1) // bs] * bs + (n - 1) % bs for s, n in zip(packed, lens, strict=True)]
        # whole blocks are gathered (one 12 KB row each for SmolLM2, not one per token); positions
        # past a row's length (the rest of its last block, padding blocks) are masked
        lens_t = torch.tensor(lens, dtype=torch.long)[:, None]  # [B, 1]
        pos = torch.arange(max_blocks * bs)[None, :]  # [1, L]
        visible = pos < lens_t
        masks: dict[int | None, Tensor] = {None: visible[:, None, None, :].to(self.device, non_blocking=True)}
        for w in self.windows:
            masks[w] = (visible & (pos >= lens_t - w))[:, None, None, :].to(self.device, non_blocking=True)
        return StepInputs(
            input_ids=self._tensor([s.token_ids[-1] for s in packed]), positions=self._tensor([n - 1 for n in lens]),
            slot_mapping=self._tensor(slots), last_index=self._tensor(last),
            lora=self._lora_batch(seg_rows, seg_slots),
            block_index=self._tensor([b for t in tables for b in t]), decode_masks=masks,
        )

    # ---- forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], prefill: bool) -> Tensor:
        """Logits [B, V] fp32 of each sequence's last token, row i for seqs[i]. K/V of every
        processed token is written into the sequence's cache blocks (allocated by the caller)."""
        step = self.prepare_prefill(seqs) if prefill else self.prepare_decode(seqs)
        return self.forward(step)

    @torch.inference_mode()
    def run_scored(self, seqs: list[Sequence], scored: list[int]) -> tuple[Tensor, dict[int, list[float]]]:
        """A prefill step, `run(seqs, prefill=True)`, that also scores the prompts of seqs[i] for i
        in `scored` (LoRAX's decoder_input_details): for prompt position p in 1..n-1, the logprob of
        token p given tokens 0..p-1, log_softmax of the raw logits (no penalty, no temperature).
        Returns the logits [B, V] and, per scored row, its n - 1 logprobs. The vocabulary
        projection runs SCORE_CHUNK prompt tokens at a time, so [T, V] logits never exist at once."""
        step = self.prepare_prefill(seqs)
        h = self._hidden(step)  # [T, hidden]
        last = step.last_index.tolist()
        scores: dict[int, list[float]] = {}
        for i in scored:
            seq = seqs[i]
            start, n = last[i] + 1 - seq.num_tokens, seq.num_prompt_tokens
            targets = torch.tensor(seq.token_ids[1:n], dtype=torch.long, device=h.device)  # [n-1]
            out: list[float] = []
            for c in range(0, n - 1, SCORE_CHUNK):
                rows = torch.arange(start + c, start + min(c + SCORE_CHUNK, n - 1), device=h.device)
                logp = torch.log_softmax(self._logits(h, rows), dim=-1)  # [chunk, V]
                out += logp.gather(1, targets[c:c + len(rows), None])[:, 0].tolist()
            scores[i] = out
        return self._logits(h, step.last_index), scores

    def forward(self, step: StepInputs) -> Tensor:
        return self._logits(self._hidden(step), step.last_index)

    def _logits(self, h: Tensor, index: Tensor) -> Tensor:
        """Logits [N, V] fp32 of the packed tokens at index [N]: final norm, then the vocabulary."""
        return self.lm_head(self.final_norm(h[index])).float()

    def _hidden(self, step: StepInputs) -> Tensor:
        """The decoder layers over the packed tokens: [T, hidden], before the final norm."""
        h = self.embed(step.input_ids)  # [T, hidden]
        cos, sin = self.rotary(h, step.positions[None])  # [1, T, D] each, rope scaling applied
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, D]
        for i, layer in enumerate(self.layers):
            x = self._rms_norm(h, layer.input_norm)
            q = self._project(x, layer, i, "q_proj", step.lora).view(-1, self.num_heads, self.head_dim)  # [T, H, D]
            k = self._project(x, layer, i, "k_proj", step.lora).view(-1, self.num_kv_heads, self.head_dim)  # [T, KV, D]
            v = self._project(x, layer, i, "v_proj", step.lora).view(-1, self.num_kv_heads, self.head_dim)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            layer.k_cache.flatten(0, 1).index_copy_(0, step.slot_mapping, k)  # flat slot = block * size + offset
            layer.v_cache.flatten(0, 1).index_copy_(0, step.slot_mapping, v)
            if step.bounds is not None:
                o = self._prefill_attention(q, k, v, step, layer.window)
            else:
                o = self._decode_attention(q, layer, step)
            h = h + self._project(o, layer, i, "o_proj", step.lora)  # [T, hidden]
            x = self._rms_norm(h, layer.post_norm)
            gate = self._project(x, layer, i, "gate_proj", step.lora)  # [T, I]
            up = self._project(x, layer, i, "up_proj", step.lora)
            m = layer.act(gate) * up
            h = h + self._project(m, layer, i, "down_proj", step.lora)
        return h

    def _project(self, x: Tensor, layer: _Layer, i: int, module: str, lora: LoraBatch | None) -> Tensor:
        """y = x W^T + b, plus each row's LoRA delta (in place). x [T, in] -> [T, out]."""
        weight, bias = layer.linear[module]
        y = F.linear(x, weight, bias)
        if lora is not None:
            self.lora_op.apply(y, x, i, module, lora)
        return y

    def _rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """HF LlamaRMSNorm: normalise in fp32, cast back, then scale by the weight."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.eps)
        return weight * F.rms_norm(x.float(), weight.shape, None, self.eps).to(x.dtype)

    def _prefill_attention(self, q: Tensor, k: Tensor, v: Tensor, step: StepInputs, window: int | None) -> Tensor:
        """Causal attention within each packed sequence. q [T, H, D], k/v [T, KV, D] -> [T, H * D]."""
        out = torch.empty_like(q)
        masks = step.prefill_masks[window] if window is not None else None
        for j, (s, e) in enumerate(step.bounds):
            mask = masks[j] if masks is not None else None
            out[s:e] = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None],
                attn_mask=mask, is_causal=mask is None, scale=self.scaling, enable_gqa=True,
            )[0].transpose(0, 1)
        return out.view(q.shape[0], -1)

    def _decode_attention(self, q: Tensor, layer: _Layer, step: StepInputs) -> Tensor:
        """Each row's query against its paged context. q [B, H, D] -> [B, H * D]. The H query heads of
        one KV head form the query "length" axis ([B, KV, H/KV, D]), so no K/V repeat is needed."""
        b = q.shape[0]
        shape = (b, -1, self.num_kv_heads, self.head_dim)  # [B, L, KV, D]
        k = layer.k_cache.index_select(0, step.block_index).view(shape).transpose(1, 2)  # [B, KV, L, D]
        v = layer.v_cache.index_select(0, step.block_index).view(shape).transpose(1, 2)
        q = q.view(b, self.num_kv_heads, -1, self.head_dim)  # [B, KV, G, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.decode_masks[layer.window], scale=self.scaling)
        return out.reshape(b, -1)


def _data(p: torch.nn.Parameter | None) -> Tensor | None:
    return None if p is None else p.data


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF apply_rotary_pos_emb on [T, heads, D] with cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _sliding_causal(n: int, window: int, device: torch.device) -> Tensor:
    """[n, n] bool: query i sees key j when 0 <= i - j < window."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & (i - j < window)
