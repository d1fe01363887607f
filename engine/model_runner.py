"""One packed forward pass per step over the HF model's own weights, with a paged KV cache and a
batched LoRA op on every target projection.

A step packs decode rows (one token each, attention over the row's paged context) and prompt
chunks (several tokens of one sequence: causal attention within the chunk, after the sequence's
earlier chunks, read back from the cache), so a prompt joins running rows in their step, whole or
split over steps (Sarathi-Serve, vLLM v1). Within the decode rows and within the chunks, rows with
the same adapter slot are consecutive: that is the segment layout the LoRA op (SGMV-style) reads.
Logits are computed only for the last token of each row that reaches its end: for SmolLM2
the vocabulary projection is 57 MFLOP per token against 212 for all 30 layers, so projecting every
prefill token would add ~27% to a prefill step (and [T, 49152] fp32 logits: 430 MB at T=2240).

We reuse the HF model's modules where they carry semantics (embedding, rotary embedding with its
rope scaling, final norm, activation) and reference its Linear weights in place (on CPU in fp32, by
default, GEMMs run on oneDNN-packed copies instead: `Linear`, with q/k/v and gate/up stacked into
one packed GEMM each: `STACKS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.config import LORA_MODULES
from engine.decode_lanes import DecodeLanes, LanePlan
from engine.kv_cache import KVCache
from engine.model_loader import LoadedModel

if TYPE_CHECKING:
    from engine.lora_op import LoraBatch, LoraOp
    from engine.sequence import Sequence


ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Projections of one input that run as one GEMM on packed weights (vLLM's QKVParallelLinear and
# MergedColumnParallelLinear). A 32-row decode step of SmolLM2 on a 2-core Xeon, in turns in one
# process: base 101.4 -> 96.7 ms, 32 adapters 122.1 -> 118.4 ms (the LoRA op adds into the column blocks).
STACKS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
SCORE_CHUNK = 256  # prompt tokens projected onto the vocabulary at once by run_scored


class Linear:
    """y = x W^T + b, x [T, in] -> [T, out], on the HF module's weight [out, in] (never copied), or,
    when `packed`, on a copy of it repacked once into oneDNN's blocked layout, as torch.compile's
    weight freezing does on CPU. Measured on this 2-core CPU in fp32, 32 rows: 1.3x (the layers'
    shapes) to 2.2x (the vocabulary) faster than F.linear; the cost is a second copy of the weights.
    Same math, another summation order: results agree with F.linear to fp32 rounding."""

    def __init__(self, weight: Tensor, bias: Tensor | None, packed: bool, batch_hint: int) -> None:
        self.bias = bias
        self.out_features = weight.shape[0]
        # packed: `weight` is not kept (it may be a temporary, e.g. stacked projections)
        self._weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint) if packed else weight
        self._packed = packed

    def __call__(self, x: Tensor) -> Tensor:
        if not self._packed:
            return F.linear(x, self._weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._weight, self.bias, "none", [], "")


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's packed fp32 linear is there: CPU, fp32, a torch built with oneDNN."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@dataclass
class _Layer:
    """References to one decoder layer's parameters, its projections by module name."""

    input_norm: Tensor  # [hidden]
    post_norm: Tensor  # [hidden]
    linear: dict[str, Linear]  # the projections not in `stacked`
    stacked: dict[tuple[str, ...], Linear]  # a STACKS group -> one Linear on its weights one above the other
    act: Callable[[Tensor], Tensor]
    window: int | None  # sliding window (keys with q_pos - k_pos < window are visible) or None
    k_cache: Tensor  # KV cache of this layer [num_blocks, block_size, kv_heads, head_dim]
    v_cache: Tensor


@dataclass
class _Chunk:
    """One prompt chunk's attention: packed tokens [start, end), the next tokens of its sequence."""

    start: int
    end: int
    context: Tensor | None  # [blocks] its sequence's cache blocks up to the chunk's end; None: a first chunk
    masks: dict[int | None, Tensor | None]  # window (None: full) -> [n, keys] bool, keys visible; None: causal


@dataclass
class StepInputs:
    """Per-step metadata, built once on the host and shared by every layer. The packed tokens are
    one per decode row first (rows grouped by adapter slot), then each prompt chunk."""

    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    slot_mapping: Tensor  # [T] flat cache slot receiving each token's K/V
    last_index: Tensor  # [N] packed index of the last token of each row that reaches its end, in caller order
    row_start: list[int]  # packed index of each row's first token, in caller order
    lora: LoraBatch | None  # None when no row has an adapter
    # decode rows: the first num_decode tokens; the cache blocks of each one's context, and which
    # of their positions it may see
    num_decode: int = 0
    lanes: LanePlan | None = None  # where the rows' context is held dense (CPU); None: gathered per layer
    block_index: Tensor | None = None  # [num_decode * max_blocks] cache blocks of each row, zero-padded
    gathered: tuple[Tensor, Tensor] | None = None  # K, V buffers [num_decode * max_blocks, size, KV, D], every layer's
    decode_masks: dict[int | None, Tensor] | None = None  # window -> [num_decode, 1, 1, keys], rows in lane order
    chunks: list[_Chunk] = field(default_factory=list)  # the prompt chunks, after the decode rows


def _window(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or layer_types is None:
        return window
    return window if layer_types[layer_idx] == "sliding_attention" else None


class ModelRunner:
    def __init__(self, model: LoadedModel, kv_cache: KVCache, lora_op: LoraOp | None = None,
                 pack_weights: bool = False, batch_hint: int = 32) -> None:
        """`pack_weights`: run every projection and the vocabulary on oneDNN-packed copies of their
        weights (`Linear`; only where `can_pack`). `batch_hint`: the rows per step to pack for."""
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
        packed = pack_weights and can_pack(model.device, model.dtype)
        self.lm_head = Linear(hf.lm_head.weight.data, _data(hf.lm_head.bias), packed, batch_hint)
        self.layers: list[_Layer] = []
        for i, layer in enumerate(hf.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            linears = {name: getattr(attn if name in ATTN_MODULES else mlp, name) for name in LORA_MODULES}
            stacks = STACKS if packed else ()  # stacking copies the weights: only into the packed copy made anyway
            self.layers.append(_Layer(
                input_norm=layer.input_layernorm.weight.data, post_norm=layer.post_attention_layernorm.weight.data,
                linear={name: Linear(m.weight.data, _data(m.bias), packed, batch_hint) for name, m in linears.items()
                        if not any(name in stack for stack in stacks)},
                stacked={stack: _stack([linears[m] for m in stack], batch_hint) for stack in stacks},
                act=mlp.act_fn, window=_window(config, i),
                k_cache=kv_cache.k[i], v_cache=kv_cache.v[i],
            ))
        self.out_features = {name: out for name, (_, out) in model.spec.module_shapes.items()}
        self.windows = sorted({layer.window for layer in self.layers if layer.window is not None})
        # On CPU decode rows keep their K/V in lanes (engine/decode_lanes.py): at most as many tokens
        # again as the paged cache holds, which host memory affords; device memory is kept for the cache.
        self.lanes = DecodeLanes(kv_cache) if self.device.type == "cpu" else None

    # ---- step metadata -------------------------------------------------------------------------

    def _grouped(self, rows: list[int], seqs: list[Sequence]) -> list[int]:
        """`rows` grouped by adapter slot: base rows first, then the slots in the LoRA op's order
        (which keeps a slot where it was in the step before)."""
        slots = sorted({seqs[i].adapter_slot for i in rows} - {-1})
        if self.lora_op is not None:
            slots = self.lora_op.order(slots)
        place = {slot: k for k, slot in enumerate([-1, *slots])}
        return sorted(rows, key=lambda i: place[seqs[i].adapter_slot])

    def _lora_batch(self, seg_lens: list[int], seg_slots: list[int]) -> LoraBatch | None:
        if self.lora_op is None or all(s < 0 for s in seg_slots):
            return None
        return self.lora_op.prepare(seg_lens, seg_slots)

    def _tensor(self, data) -> Tensor:
        return torch.tensor(data, dtype=torch.long).to(self.device, non_blocking=True)

    def prepare(self, seqs: list[Sequence], num_new: list[int]) -> StepInputs:
        """Row i runs tokens [c, c + num_new[i]) of seqs[i], c its num_computed_tokens. Rows of one
        token (decode rows) are packed first, grouped by adapter slot in the LoRA op's order, so
        their segments stay where they were from one step to the next; prompt chunks follow, by slot."""
        bs = self.kv_cache.block_size
        decode = self._grouped([i for i, n in enumerate(num_new) if n == 1], seqs)
        chunks = sorted((i for i, n in enumerate(num_new) if n > 1), key=lambda i: seqs[i].adapter_slot)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seg_lens: list[int] = []
        seg_slots: list[int] = []
        row_start = [0] * len(seqs)
        for part in (decode, chunks):
            first_segment = len(seg_slots)  # a segment never spans decode rows and a chunk
            for i in part:
                seq, n = seqs[i], num_new[i]
                c, table = seq.num_computed_tokens, seq.block_table
                row_start[i] = len(ids)
                ids.extend(seq.token_ids[c:c + n])
                positions.extend(range(c, c + n))
                slots.extend(table[p // bs] * bs + p % bs for p in range(c, c + n))
                if len(seg_slots) > first_segment and seg_slots[-1] == seq.adapter_slot:
                    seg_lens[-1] += n
                else:
                    seg_lens.append(n)
                    seg_slots.append(seq.adapter_slot)
        last = [row_start[i] + n - 1 for i, (seq, n) in enumerate(zip(seqs, num_new, strict=True))
                if seq.num_computed_tokens + n == seq.num_tokens]
        step = StepInputs(
            input_ids=self._tensor(ids), positions=self._tensor(positions), slot_mapping=self._tensor(slots),
            last_index=self._tensor(last), row_start=row_start, lora=self._lora_batch(seg_lens, seg_slots),
            num_decode=len(decode), chunks=[self._chunk(seqs[i], row_start[i], num_new[i]) for i in chunks],
        )
        if decode:
            self._decode_metadata(step, [seqs[i] for i in decode])
        elif self.lanes is not None:
            self.lanes.forget()
        return step

    def _decode_metadata(self, step: StepInputs, rows: list[Sequence]) -> None:
        """Where each decode row's context (its tokens up to the one it runs) is read: its lane
        (`DecodeLanes`), or else its whole cache blocks gathered per layer (one 12 KB row each for
        SmolLM2, not one per token); positions past it are masked."""
        bs = self.kv_cache.block_size
        lanes = self.lanes.plan(rows) if self.lanes is not None else None
        if lanes is not None:
            lens, length = list(lanes.lens), lanes.length
        else:
            lens = [s.num_computed_tokens + 1 for s in rows]
            length = -(-max(lens) // bs) * bs
        lens_t = torch.tensor(lens, dtype=torch.long)[:, None]  # [B, 1]
        pos = torch.arange(length)[None, :]  # [1, L]
        visible = pos < lens_t
        masks: dict[int | None, Tensor] = {None: visible[:, None, None, :].to(self.device, non_blocking=True)}
        for w in self.windows:
            masks[w] = (visible & (pos >= lens_t - w))[:, None, None, :].to(self.device, non_blocking=True)
        step.decode_masks = masks
        step.lanes = lanes
        if lanes is not None:
            return
        max_blocks = length // bs
        tables = [s.block_table[:max_blocks] + [0] * (max_blocks - len(s.block_table)) for s in rows]
        step.block_index = self._tensor([b for t in tables for b in t])
        # Every layer gathers into the same two buffers: a fresh multi-MB tensor per layer would be
        # fresh pages from the OS each time (measured: the gather 1.7x slower on CPU).
        cache = self.kv_cache.k[0]
        shape = (len(rows) * max_blocks, *cache.shape[1:])
        step.gathered = (cache.new_empty(shape), cache.new_empty(shape))

    def _chunk(self, seq: Sequence, start: int, n: int) -> _Chunk:
        """A chunk of n tokens from position c = seq.num_computed_tokens: the first (c = 0) attends
        within itself; a later one also to the earlier chunks, read back from the cache."""
        c = seq.num_computed_tokens
        if c == 0:
            masks: dict[int | None, Tensor | None] = {None: None}
            for w in self.windows:
                masks[w] = None if n <= w else _sliding_causal(n, w, self.device)
            return _Chunk(start, start + n, None, masks)
        num_blocks = -(-(c + n) // self.kv_cache.block_size)
        q_pos = torch.arange(c, c + n)[:, None]  # [n, 1]
        k_pos = torch.arange(num_blocks * self.kv_cache.block_size)[None, :]  # [1, keys]
        causal = k_pos <= q_pos
        masks = {None: causal.to(self.device, non_blocking=True)}
        for w in self.windows:
            masks[w] = (causal & (q_pos - k_pos < w)).to(self.device, non_blocking=True)
        return _Chunk(start, start + n, self._tensor(seq.block_table[:num_blocks]), masks)

    # ---- forward -------------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new: list[int] | None = None) -> Tensor:
        """Row i runs its next num_new[i] tokens (default: every token not yet cached) from its
        num_computed_tokens on: their K/V goes into its cache blocks (allocated by the caller) and
        they count as computed. Returns logits [N, V] fp32 of the last token of each row that
        reaches its end (every row, unless a prompt is still being prefilled), in the order of seqs."""
        num_new = [s.num_uncomputed_tokens for s in seqs] if num_new is None else num_new
        logits = self.forward(self.prepare(seqs, num_new))
        _advance(seqs, num_new)
        return logits

    @torch.inference_mode()
    def run_scored(self, seqs: list[Sequence], num_new: list[int], scored: list[int]
                   ) -> tuple[Tensor, dict[int, list[float]]]:
        """`run(seqs, num_new)` that also scores the prompt tokens of seqs[i] for i in `scored`
        (LoRAX's decoder_input_details): for each prompt position p the step runs, with p + 1 a
        prompt position too, the logprob of token p + 1 given tokens 0..p: log_softmax of the raw
        logits (no penalty, no temperature). Returns the logits and, per scored row, those logprobs
        in order (a prompt chunked over steps is scored chunk by chunk). The vocabulary projection
        runs SCORE_CHUNK prompt tokens at a time, so [T, V] logits never exist at once."""
        step = self.prepare(seqs, num_new)
        h = self._hidden(step)  # [T, hidden]
        scores: dict[int, list[float]] = {}
        for i in scored:
            seq, c = seqs[i], seqs[i].num_computed_tokens
            end = min(c + num_new[i], seq.num_prompt_tokens - 1)  # positions p < end are scored
            targets = torch.tensor(seq.token_ids[c + 1:end + 1], dtype=torch.long, device=h.device)  # [end - c]
            out: list[float] = []
            for p in range(c, end, SCORE_CHUNK):
                first = step.row_start[i] + p - c
                rows = torch.arange(first, first + min(SCORE_CHUNK, end - p), device=h.device)
                logp = torch.log_softmax(self._logits(h, rows), dim=-1)  # [chunk, V]
                out += logp.gather(1, targets[p - c:p - c + len(rows), None])[:, 0].tolist()
            scores[i] = out
        logits = self._logits(h, step.last_index)
        _advance(seqs, num_new)
        return logits, scores

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
            q, k, v = self._projects(x, layer, i, ("q_proj", "k_proj", "v_proj"), step.lora)
            q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
            k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, KV, D]
            v = v.view(-1, self.num_kv_heads, self.head_dim)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            layer.k_cache.flatten(0, 1).index_copy_(0, step.slot_mapping, k)  # flat slot = block * size + offset
            layer.v_cache.flatten(0, 1).index_copy_(0, step.slot_mapping, v)
            if step.chunks:
                o = self._mixed_attention(q, k, v, i, layer, step)
            else:
                o = self._decode_attention(q, k, v, i, layer, step)
            h = h + self._project(o, layer, i, "o_proj", step.lora)  # [T, hidden]
            x = self._rms_norm(h, layer.post_norm)
            gate, up = self._projects(x, layer, i, ("gate_proj", "up_proj"), step.lora)  # [T, I] each
            m = layer.act(gate) * up
            h = h + self._project(m, layer, i, "down_proj", step.lora)
        if step.lanes is not None and self.lanes is not None:
            self.lanes.commit(step.lanes)
        return h

    def _project(self, x: Tensor, layer: _Layer, i: int, module: str, lora: LoraBatch | None) -> Tensor:
        """y = x W^T + b, plus each row's LoRA delta (in place). x [T, in] -> [T, out]."""
        y = layer.linear[module](x)
        if lora is not None and self.lora_op is not None:
            self.lora_op.apply(y, x, i, module, lora)
        return y

    def _projects(self, x: Tensor, layer: _Layer, i: int, modules: tuple[str, ...], lora: LoraBatch | None
                  ) -> tuple[Tensor, ...]:
        """`_project` of each module on the same x; one GEMM when the layer stacks them, whose
        output's column blocks (strided views) are the projections."""
        stacked = layer.stacked.get(modules)
        if stacked is None:
            return tuple(self._project(x, layer, i, m, lora) for m in modules)
        ys = stacked(x).split([self.out_features[m] for m in modules], dim=-1)
        if lora is not None and self.lora_op is not None:
            for m, y in zip(modules, ys, strict=True):
                self.lora_op.apply(y, x, i, m, lora)
        return ys

    def _rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """HF LlamaRMSNorm: normalise in fp32, cast back, then scale by the weight."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, self.eps)
        return weight * F.rms_norm(x.float(), weight.shape, None, self.eps).to(x.dtype)

    def _mixed_attention(self, q: Tensor, k: Tensor, v: Tensor, i: int, layer: _Layer, step: StepInputs) -> Tensor:
        """The decode rows (the first num_decode tokens) as `_decode_attention`, then each prompt
        chunk: causal within itself, after its sequence's earlier chunks, which are read back from
        the cache (as are its own K/V, written there before). q [T, H, D], k/v [T, KV, D] -> [T, H * D]."""
        out = torch.empty_like(q)
        d = step.num_decode
        if d:
            out[:d] = self._decode_attention(q[:d], k[:d], v[:d], i, layer, step).view(d, self.num_heads, self.head_dim)
        for chunk in step.chunks:
            s, e = chunk.start, chunk.end
            if chunk.context is None:
                keys, values = k[s:e], v[s:e]  # [n, KV, D]
            else:
                keys = layer.k_cache.index_select(0, chunk.context).flatten(0, 1)  # [blocks * size, KV, D]
                values = layer.v_cache.index_select(0, chunk.context).flatten(0, 1)
            mask = chunk.masks[layer.window]
            out[s:e] = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                attn_mask=mask, is_causal=mask is None, scale=self.scaling, enable_gqa=True,
            )[0].transpose(0, 1)
        return out.view(q.shape[0], -1)

    def _decode_attention(self, q: Tensor, k: Tensor, v: Tensor, i: int, layer: _Layer, step: StepInputs) -> Tensor:
        """Each row's query against its context, read from its lane or gathered from the paged cache.
        q [B, H, D], k/v [B, KV, D] the rows' new K/V (already in the cache) -> [B, H * D]. No K/V
        repeat: the H/KV query heads of one KV head form the query "length" axis ([B, KV, H/KV, D]),
        so each KV head is read once. (SDPA's enable_gqa, each query head a query of length 1, read
        every KV head H/KV times: on CPU 15% faster on K/V just gathered, in cache, 15% slower on
        lanes read from memory: 30 layers, 32 rows, SmolLM2.)"""
        assert step.decode_masks is not None
        b = q.shape[0]
        lanes = step.lanes
        if lanes is not None and self.lanes is not None:  # [B, KV, L, D], rows in lane order
            keys, values = self.lanes.read(i, layer.k_cache, layer.v_cache, k, v, lanes)
            if lanes.row_of_lane is not None:
                q = q.index_select(0, lanes.row_of_lane)
        else:
            assert step.block_index is not None and step.gathered is not None
            shape = (b, -1, self.num_kv_heads, self.head_dim)  # [B, L, KV, D]
            k_buf, v_buf = step.gathered
            keys = torch.index_select(layer.k_cache, 0, step.block_index, out=k_buf).view(shape).transpose(1, 2)
            values = torch.index_select(layer.v_cache, 0, step.block_index, out=v_buf).view(shape).transpose(1, 2)
        q = q.view(b, self.num_kv_heads, -1, self.head_dim)  # [B, KV, G, D]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.decode_masks[layer.window],
                                             scale=self.scaling).reshape(b, -1)
        if lanes is not None and lanes.lane_of_row is not None:
            out = out.index_select(0, lanes.lane_of_row)
        return out


def _advance(seqs: list[Sequence], num_new: list[int]) -> None:
    """The step's tokens are in the cache now."""
    for seq, n in zip(seqs, num_new, strict=True):
        seq.num_computed_tokens += n


def _data(p: torch.nn.Parameter | None) -> Tensor | None:
    return None if p is None else p.data


def _stack(modules: list[torch.nn.Linear], batch_hint: int) -> Linear:
    """One packed Linear on the modules' weights [sum(out), in] (biases, zeros where one has none)."""
    weight = torch.cat([m.weight.data for m in modules])
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias.data if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])
    return Linear(weight, bias, True, batch_hint)


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
