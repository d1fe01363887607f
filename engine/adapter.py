"""One PEFT LoRA adapter read from disk, validated against the base model, laid out for the op.

PEFT stores `lora_A.weight` [r, in] and `lora_B.weight` [out, r] and computes
`y += scale * (x @ A.T) @ B.T` with `scale = alpha / r` (or `alpha / sqrt(r)` with rslora).
A `LayerRun` holds one module's layers in that layout ([layers, r, in] and [layers, out, r], the
scale beside them), so a device slot (the same layout, scale folded into B) takes an adapter in a
few copies rather than one per layer and module, and the copy is the only pass that scales.

Which modules an adapter targets, and each module's r and alpha, are resolved exactly as PEFT
resolves them (target_modules / exclude_modules / layers_to_transform / layers_pattern /
rank_pattern / alpha_pattern: mirrored from `peft.tuners.tuners_utils.check_target_module_exists`
and `peft.utils.other.get_pattern_key`), then checked against the tensors in the file: every
expected module must have both tensors, and no other tensor may be present.

A load of an fp32 safetensors file is a read and a check, with no copy: the file is read with one
`readinto`, its header checked before any data is read (and parsed once for all the files that
share it byte for byte: adapters saved alike do); the data are checked for non-finite values in
one pass; what a config selects is resolved once per distinct config (adapters of one deployment
share theirs). The runs are then strided views of that one buffer: files lay their layers out in
blocks of one size (in name order, so layer 10 follows layer 1), and consecutive layers whose
tensors lie evenly spaced form one run. Other dtypes are converted once, into the compute dtype.
(`python -m benchmarks.adapter_load` measures it against a plain read of the files.)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from engine.config import LORA_MODULE_PARENT, LORA_MODULES
from engine.request import EngineError, ErrorType
from engine.spare_buffers import SpareBuffers

if TYPE_CHECKING:
    from engine.model_loader import ModelSpec

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20

_UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head")
_TENSOR_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_MODULE_KEY = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\.(?P<name>\w+)")
# Config fields whose feature changes the math or adds weights we do not serve. Each must be falsy.
_REFUSED_FIELDS = (
    "use_dora", "lora_bias", "modules_to_save", "target_parameters", "fan_in_fan_out",
    "layer_replication", "trainable_token_indices", "alora_invocation_tokens", "use_qalora",
    "arrow_config", "use_bdlora", "kasa_config", "megatron_config",
)


@dataclass(frozen=True)
class LayerRun:
    """One module's weights over consecutive layers that share a rank and a scale: one copy into a
    slot. A and B may be strided views (of the file's buffer)."""

    module: str
    first_layer: int
    A: Tensor  # [n, r, in]: lora_A per layer
    B: Tensor  # [n, out, r]: lora_B per layer, to be multiplied by `scale`
    scale: float = 1.0

    @property
    def layers(self) -> slice:
        return slice(self.first_layer, self.first_layer + self.A.shape[0])

    @property
    def rank(self) -> int:
        return self.A.shape[1]


@dataclass
class AdapterWeights:
    """Host copy of one validated PEFT adapter, ready to be copied into a device slot."""

    key: str  # AdapterRef.key
    rank: int  # max rank over its modules
    runs: tuple[LayerRun, ...]
    nbytes: int

    @classmethod
    def from_modules(cls, key: str, modules: Mapping[tuple[int, str], tuple[Tensor, Tensor]]) -> AdapterWeights:
        """From per-layer pairs (layer, module) -> (A [in, r], B [r, out]): `x @ A @ B` is the delta."""
        runs = tuple(LayerRun(module, layers[0], torch.stack([modules[layer, module][0].T for layer in layers]),
                              torch.stack([modules[layer, module][1].T for layer in layers]))
                     for module, layers in _layer_runs({k: ab[0].shape[1] for k, ab in modules.items()}))
        return cls(key, max(run.rank for run in runs), runs, sum(run.A.nbytes + run.B.nbytes for run in runs))

    @property
    def modules(self) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        """Per layer: (layer, module) -> (A [in, r], B [r, out] * scale), so that `x @ A @ B` is the
        delta; views where the scale is 1."""
        return {(run.first_layer + i, run.module): (run.A[i].T, run.B[i].T * run.scale if run.scale != 1.0
                                                    else run.B[i].T) for run in self.runs for i in range(len(run.A))}

    def pin_memory(self) -> AdapterWeights:
        """A copy in page-locked memory, so host -> device copies can be asynchronous (CUDA only)."""
        runs = tuple(replace(r, A=r.A.pin_memory(), B=r.B.pin_memory()) for r in self.runs)
        return AdapterWeights(self.key, self.rank, runs, self.nbytes)


def _layer_runs(tags: Mapping[tuple[int, str], Hashable]) -> list[tuple[str, list[int]]]:
    """(module, layers) per run of consecutive layers of one module with equal tags (rank, scale),
    in LORA_MODULES order, layers ascending."""
    runs: list[tuple[str, list[int]]] = []
    for layer, module in sorted(tags, key=lambda k: (LORA_MODULES.index(k[1]), k[0])):
        last = runs[-1] if runs else None
        if last is not None and last[0] == module and last[1][-1] == layer - 1 \
                and tags[layer - 1, module] == tags[layer, module]:
            last[1].append(layer)
        else:
            runs.append((module, [layer]))
    return runs


def _invalid(message: str) -> EngineError:
    return EngineError(ErrorType.ADAPTER_INVALID, message)


def _module_key(layer: int, name: str) -> str:
    """The module's name in `named_modules()` of the HF causal LM, which is what PEFT matches."""
    return f"model.layers.{layer}.{LORA_MODULE_PARENT[name]}.{name}"


def get_pattern_key(pattern_keys, key: str) -> str:
    """Mirror of `peft.utils.other.get_pattern_key`: the first pattern that matches a suffix of key."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _is_targeted(cfg: dict, key: str) -> bool:
    """Mirror of `peft.tuners.tuners_utils.check_target_module_exists` for one module key."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        return targets == "all-linear" and key != "lm_head" or re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layer_indexes = cfg.get("layers_to_transform")
    if layer_indexes is None or (isinstance(layer_indexes, list) and not layer_indexes):
        return True
    patterns = cfg.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layer_indexes if isinstance(layer_indexes, int) else idx in layer_indexes


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise _invalid(f"{CONFIG_FILE} missing in the adapter directory")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise _invalid(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _invalid(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise _invalid(f"{CONFIG_FILE} must hold a JSON object")
    return cfg


def _check_config(cfg: dict, max_rank: int) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _invalid(f"peft_type {peft_type!r} is not supported (only LORA)")
    if cfg.get("bias", "none") != "none":
        raise _invalid(f"bias={cfg['bias']!r} is not supported (only 'none')")
    for name in _REFUSED_FIELDS:
        if cfg.get(name):
            raise _invalid(f"{name}={cfg[name]!r} is not supported")
    _check_patterns(cfg)
    targets = cfg.get("target_modules")
    if not targets or not isinstance(targets, (str, list)):
        raise _invalid("target_modules must be a non-empty list or a regex string")
    if isinstance(targets, list):
        for t in targets:
            if not isinstance(t, str):
                raise _invalid(f"target_modules holds a non-string entry {t!r}")
            if t.split(".")[-1] in _UNSUPPORTED_TARGETS:
                raise _invalid(f"target_modules: {t!r} is not supported (only {', '.join(LORA_MODULES)})")
    else:
        for key in ("model.embed_tokens", "lm_head"):
            if targets != "all-linear" and re.fullmatch(targets, key):
                raise _invalid(f"target_modules regex matches {key} (not supported)")
    for name in ("r", "lora_alpha"):
        v = cfg.get(name, 8)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _invalid(f"{name} must be a number, got {v!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        for k, v in (cfg.get(name) or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _invalid(f"{name}[{k!r}] must be a number, got {v!r}")
    ranks = [cfg.get("r", 8), *(cfg.get("rank_pattern") or {}).values()]
    for r in ranks:
        if int(r) != r or not 1 <= r:
            raise _invalid(f"r / rank_pattern: rank must be an integer >= 1, got {r!r}")
        if r > max_rank:
            raise _invalid(f"r / rank_pattern: rank {r} exceeds max_lora_rank {max_rank}")


def _check_patterns(cfg: dict) -> None:
    """Types and regexes of the module-selection fields, so matching cannot raise later."""
    def regex(field: str, pattern) -> None:
        if not isinstance(pattern, str):
            raise _invalid(f"{field} holds a non-string entry {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise _invalid(f"{field}: invalid regex {pattern!r} ({e})") from None

    for field in ("target_modules", "exclude_modules", "layers_pattern"):
        value = cfg.get(field)
        if value is None:
            continue
        if not isinstance(value, (str, list)):
            raise _invalid(f"{field} must be a string or a list of strings, got {value!r}")
        for pattern in [value] if isinstance(value, str) else value:
            regex(field, pattern)
    for field in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(field) or {}
        if not isinstance(value, dict):
            raise _invalid(f"{field} must be an object")
        for key in value:
            regex(field, key)
    layers = cfg.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) or (
            isinstance(layers, list) and all(isinstance(i, int) for i in layers))):
        raise _invalid(f"layers_to_transform must be an int or a list of ints, got {layers!r}")


def _expected_modules(cfg: dict, spec: ModelSpec) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, module) -> (r, alpha) for every module PEFT would wrap in this base model."""
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for layer in range(spec.num_layers):
        for name in LORA_MODULES:
            key = _module_key(layer, name)
            if _is_targeted(cfg, key):
                r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), cfg.get("r", 8))
                alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), key), cfg.get("lora_alpha", 8))
                out[(layer, name)] = (int(r), float(alpha))
    if not out:
        raise _invalid(f"target_modules {cfg['target_modules']!r} selects no module of {spec.base_model_name}")
    return out


def _parse_key(key: str, spec: ModelSpec) -> tuple[int, str, str]:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> (3, "q_proj", "A")."""
    if "lora_magnitude_vector" in key:
        raise _invalid(f"tensor {key}: use_dora is not supported")
    if "lora_embedding_" in key or any(t in key for t in _UNSUPPORTED_TARGETS):
        raise _invalid(f"tensor {key}: embed_tokens / lm_head targets are not supported")
    if "modules_to_save" in key:
        raise _invalid(f"tensor {key}: modules_to_save is not supported")
    if ".lora_B.bias" in key or ".lora_A.bias" in key:
        raise _invalid(f"tensor {key}: lora_bias is not supported")
    m = _TENSOR_KEY.fullmatch(key)
    mm = _MODULE_KEY.fullmatch(m.group("module")) if m else None
    if m is None or mm is None or LORA_MODULE_PARENT.get(mm.group("name")) != mm.group("parent"):
        raise _invalid(f"unexpected tensor {key} (only lora_A/lora_B of {', '.join(LORA_MODULES)})")
    layer = int(mm.group("layer"))
    if layer >= spec.num_layers:
        raise _invalid(f"tensor {key}: layer {layer} but {spec.base_model_name} has {spec.num_layers} layers "
                       f"(adapter for a different base model?)")
    return layer, mm.group("name"), m.group("ab")


@dataclass(frozen=True)
class _Plan:
    """What one config selects in one base model, resolved once: per expected (layer, module) its
    (r, alpha), the tensor names in order with the shape each must have, and each module's scale."""

    expected: dict[tuple[int, str], tuple[int, float]]
    shapes: dict[str, tuple[int, int]]  # tensor name -> required shape, in (layer, LORA_MODULES, A, B) order
    modules: dict[tuple[int, str], tuple[str, str, float]]  # (layer, module) -> (A name, B name, scale)


# Config fields that decide a _Plan; a load reuses the plan of an equal config on the same base model.
_PLAN_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
                "alpha_pattern", "r", "lora_alpha", "use_rslora")
_PLAN_CACHE_SIZE = 64
_plans: dict[tuple, _Plan] = {}


def _plan(cfg: dict, spec: ModelSpec) -> _Plan:
    """The `_Plan` of a checked config, from a small cache (loader threads may race: both compute)."""
    key = (json.dumps([cfg.get(f) for f in _PLAN_FIELDS]), spec.num_layers,  # key order matters: patterns
           tuple(spec.module_shapes.items()), spec.base_model_name)
    plan = _plans.get(key)
    if plan is None:
        expected = _expected_modules(cfg, spec)
        use_rslora = bool(cfg.get("use_rslora", False))
        shapes, modules = {}, {}
        for (layer, module), (r, alpha) in expected.items():
            fan_in, fan_out = spec.module_shapes[module]
            prefix = f"base_model.model.{_module_key(layer, module)}"
            a, b = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
            shapes[a], shapes[b] = (r, fan_in), (fan_out, r)
            modules[layer, module] = (a, b, _scale(alpha, r, use_rslora))
        plan = _Plan(expected, shapes, modules)
        if len(_plans) >= _PLAN_CACHE_SIZE:
            _plans.clear()
        _plans[key] = plan
    return plan


def _check_names(shapes: Mapping[str, tuple[int, ...]], spec: ModelSpec, plan: _Plan) -> None:
    """Every tensor is one the config selects, in the shape the base model gives it, and none is missing."""
    for key, shape in shapes.items():
        if plan.shapes.get(key) != shape:
            _check_shape(key, shape, spec, plan.expected)  # names the reason
            raise _invalid(f"unexpected tensor {key}")  # (not reached: a selected name would match)
    for name in plan.shapes:
        if name not in shapes:
            module = name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            raise _invalid(f"missing tensor {name} (target_modules selects {module})")


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ST_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER_BYTES = 100 << 20  # as the safetensors library


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets in the data section
    end: int


def _header_entries(header: object, data_len: int) -> dict[str, _Entry]:
    """The tensors a safetensors header describes; ValueError unless they tile the data section exactly
    (what the safetensors library checks too). Shapes are only sized here: `_check_names` compares
    each with the one its name must have."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {}
    for name, e in header.items():
        try:
            shape, (start, end) = tuple(e["shape"]), e["data_offsets"]
            if type(start) is not int or type(end) is not int or end - start != math.prod(shape) * _ST_ITEMSIZE[
                    e["dtype"]]:
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"entry {name!r} is malformed") from None
        entries[name] = _Entry(e["dtype"], shape, start, end)
    position = 0
    for e in sorted(entries.values(), key=lambda e: e.start):
        if e.start != position:
            raise ValueError("tensors overlap or leave gaps in the data")
        position = e.end
    if position != data_len:
        raise ValueError(f"the data section has {data_len} bytes, the header describes {position}")
    return entries


SPARES = SpareBuffers()  # safetensors data buffers; the loader refills them after each load

# Adapters saved alike (one trainer, one config) have byte-identical headers: a deployment's loads
# parse and check theirs once. Only headers of a usual size are kept (a hostile one may be 100 MB).
_HEADER_CACHE_SIZE = 64
_HEADER_CACHE_MAX_BYTES = 1 << 20
_Header = tuple[dict[str, _Entry], dict[str, tuple[int, ...]], dict[str, int] | None]
_headers: dict[bytes, _Header] = {}


def _entries(raw: bytes, data_len: int) -> _Header:
    """`_header_entries` of a raw header, each tensor's shape, and (when all share one float dtype)
    each one's element offset in the data, from a small cache keyed on the header's bytes and the
    data section's length. Cached dicts are shared: read them, never change them."""
    key = raw + data_len.to_bytes(8, "little")
    cached = _headers.get(key)
    if cached is None:
        entries = _header_entries(json.loads(raw), data_len)
        dtypes = {e.dtype for e in entries.values()}
        item = _ST_FLOATS[dtypes.pop()].itemsize if len(dtypes) == 1 and dtypes <= _ST_FLOATS.keys() else 0
        offsets = {name: e.start // item for name, e in entries.items()} if item else None
        cached = entries, {name: e.shape for name, e in entries.items()}, offsets
        if len(raw) <= _HEADER_CACHE_MAX_BYTES:
            if len(_headers) >= _HEADER_CACHE_SIZE:
                _headers.clear()
            _headers[key] = cached
    return cached


def _read_safetensors(file: Path, spec: ModelSpec, plan: _Plan) -> tuple[Tensor, dict[str, int]]:
    """The data of `file` as one fp32 tensor (the file's own buffer when it holds fp32) and each
    tensor's element offset in it, checked for names and shapes from the header before the data
    is read."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {n} in a file of {size} bytes")
            entries, shapes, offsets = _entries(f.read(n), size - 8 - n)
            _check_names(shapes, spec, plan)
            data = SPARES.take(size - 8 - n)  # [bytes] uint8
            if f.readinto(data.numpy().data) != data.numel():
                raise ValueError("the file is shorter than it was a moment ago")
    except EngineError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
        raise _invalid(f"{SAFETENSORS_FILE} is unreadable: {error}") from None
    for name, e in entries.items():
        if e.dtype not in _ST_FLOATS:
            raise _invalid(f"tensor {name} has non-float values (dtype {e.dtype})")
    if offsets is not None:  # the usual file, one dtype: its tensors tile the buffer, converted once (or not)
        return data.view(_ST_FLOATS[next(iter(entries.values())).dtype]).float(), offsets
    return _pack({name: data[e.start:e.end].clone().view(_ST_FLOATS[e.dtype]) for name, e in entries.items()})


def _read_pickle(file: Path, spec: ModelSpec, plan: _Plan) -> tuple[Tensor, dict[str, int]]:
    """The tensors of an `adapter_model.bin` (weights_only), packed like a safetensors file's."""
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _invalid(f"{PICKLE_FILE} is unreadable: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise _invalid(f"{PICKLE_FILE} must hold a dict of tensors")
    _check_names({key: tuple(t.shape) for key, t in tensors.items()}, spec, plan)
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise _invalid(f"tensor {key} has non-float values (dtype {t.dtype})")
    return _pack(tensors)


def _pack(tensors: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, int]]:
    """The tensors side by side in one fp32 tensor, and each one's element offset in it."""
    offsets, position = {}, 0
    for name, t in tensors.items():
        offsets[name], position = position, position + t.numel()
    flat = torch.empty(position)
    for name, t in tensors.items():
        flat[offsets[name]:offsets[name] + t.numel()] = t.reshape(-1)
    return flat, offsets


def _views(flat: Tensor, offsets: Mapping[str, int], plan: _Plan) -> dict[str, Tensor]:
    """Each tensor of the plan as a view of `flat`."""
    return {name: flat.as_strided(shape, (shape[1], 1), offsets[name]) for name, shape in plan.shapes.items()}


def _finite(t: Tensor) -> bool:
    """No NaN or infinity in `t` (one pass: aminmax propagates NaN)."""
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def _check_finite(tensors: Mapping[str, Tensor], plan: _Plan) -> None:
    """Refuse the first tensor, in (layer, module, A, B) order, that holds a NaN or an infinity."""
    for name in plan.shapes:
        if not _finite(tensors[name]):
            raise _invalid(f"tensor {name} has non-finite or non-float values")


def _check_shape(key: str, shape: tuple[int, ...], spec: ModelSpec, expected: dict) -> None:
    layer, name, ab = _parse_key(key, spec)
    if (layer, name) not in expected:
        raise _invalid(f"unexpected tensor {key}: target_modules does not select this module")
    r = expected[(layer, name)][0]
    fan_in, fan_out = spec.module_shapes[name]
    want = (r, fan_in) if ab == "A" else (fan_out, r)
    if shape != want:
        rank_dim = 0 if ab == "A" else 1
        what = ("rank differs from r / rank_pattern" if len(shape) == 2 and shape[rank_dim] != want[rank_dim]
                else "adapter for a different base model?")
        raise _invalid(f"tensor {key} has shape {list(shape)}, expected {list(want)} for "
                       f"{spec.base_model_name} ({what})")


@dataclass
class LoraTensors:
    """A validated PEFT LoRA adapter as stored: per module `lora_A` [r, in] and `lora_B` [out, r] in
    fp32, and the module's scale (alpha / r, or alpha / sqrt(r) with rslora, after the patterns)."""

    modules: dict[tuple[int, str], tuple[Tensor, Tensor, float]]  # (layer, module) -> (lora_A, lora_B, scale)
    scale: float  # the config's own r and lora_alpha: the scale of a module no pattern names


def _scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _read(path: Path, spec: ModelSpec, max_rank: int, allow_pickle: bool) -> tuple[dict, _Plan, Tensor, dict[str, int]]:
    """The checked config of the adapter in directory `path`, its plan, and its tensors (fp32, packed,
    finite) as `flat` and each one's element offset in it."""
    path = Path(path)
    cfg = _read_config(path)
    _check_config(cfg, max_rank)
    plan = _plan(cfg, spec)
    st_file, bin_file = path / SAFETENSORS_FILE, path / PICKLE_FILE
    if st_file.is_file():
        flat, offsets = _read_safetensors(st_file, spec, plan)
    elif bin_file.is_file():
        if not allow_pickle:
            raise _invalid(f"{PICKLE_FILE} (pickle) needs allow_pickle; provide {SAFETENSORS_FILE}")
        flat, offsets = _read_pickle(bin_file, spec, plan)
    else:
        raise _invalid(f"{SAFETENSORS_FILE} missing in the adapter directory")
    if not _finite(flat):  # the tensors tile `flat`: one pass, and a search only to name the culprit
        _check_finite(_views(flat, offsets, plan), plan)
    return cfg, plan, flat, offsets


def read_peft_lora(path: Path, spec: ModelSpec, max_rank: int, allow_pickle: bool) -> LoraTensors:
    """Read and validate the PEFT LoRA adapter in directory `path`; raise EngineError(ADAPTER_INVALID)
    naming the offending field or tensor for anything we cannot serve exactly. The tensors may be
    views of one buffer: read them, never write them."""
    cfg, plan, flat, offsets = _read(path, spec, max_rank, allow_pickle)
    tensors = _views(flat, offsets, plan)
    modules = {k: (tensors[a], tensors[b], scale) for k, (a, b, scale) in plan.modules.items()}
    use_rslora = bool(cfg.get("use_rslora", False))
    return LoraTensors(modules, _scale(float(cfg.get("lora_alpha", 8)), int(cfg.get("r", 8)), use_rslora))


class _View(NamedTuple):
    """A `LayerRun` as two views of a flat buffer: `flat.as_strided(*a)`, `flat.as_strided(*b)`."""

    module: str
    first_layer: int
    a: tuple[tuple[int, ...], tuple[int, ...], int]  # (shape, strides, offset)
    b: tuple[tuple[int, ...], tuple[int, ...], int]
    scale: float


# (id(offsets), id(plan)) -> (offsets, plan, views): the objects are kept, so their ids stay theirs
_VIEWS_CACHE_SIZE = 64
_views_cache: dict[tuple[int, int], tuple[Mapping[str, int], _Plan, list[_View]]] = {}


def _strided_runs(flat: Tensor, offsets: Mapping[str, int], plan: _Plan) -> list[LayerRun]:
    """The op's layout as views of `flat` (see `_run_views`); a header's views are found once per plan."""
    cached = _views_cache.get((id(offsets), id(plan)))
    if cached is None or cached[0] is not offsets or cached[1] is not plan:
        if len(_views_cache) >= _VIEWS_CACHE_SIZE:
            _views_cache.clear()
        cached = offsets, plan, _run_views(offsets, plan)
        _views_cache[id(offsets), id(plan)] = cached
    return [LayerRun(v.module, v.first_layer, flat.as_strided(*v.a), flat.as_strided(*v.b), v.scale)
            for v in cached[2]]


def _run_views(offsets: Mapping[str, int], plan: _Plan) -> list[_View]:
    """Per module, rank and scale, its layers in file order, cut wherever the next layer is not the
    next in number or its tensors not at the same spacing (a file in name order gives runs 0-1,
    10-19, 2, 20-29, 3-9). Row i of a run starting at offsets (a, b) with spacings (da, db) is
    `A = flat[a + i*da:].view(r, in)`, `B = flat[b + i*db:].view(out, r)`."""
    groups: dict[tuple, list[tuple[int, int, int]]] = {}  # (module, scale, shapes) -> [(A at, B at, layer)]
    for (layer, module), (a_name, b_name, scale) in plan.modules.items():
        key = (module, scale, plan.shapes[a_name], plan.shapes[b_name])
        groups.setdefault(key, []).append((offsets[a_name], offsets[b_name], layer))
    views = []
    for (module, scale, (r, fan_in), (fan_out, _)), members in groups.items():
        members.sort()
        i = 0
        while i < len(members):
            j = _evenly_spaced(members, i)
            a, b, layer = members[i]
            da, db = (members[i + 1][0] - a, members[i + 1][1] - b) if j > i + 1 else (0, 0)
            views.append(_View(module, layer, ((j - i, r, fan_in), (da, fan_in, 1), a),
                               ((j - i, fan_out, r), (db, r, 1), b), scale))
            i = j
    return views


def _evenly_spaced(members: list[tuple[int, int, int]], i: int) -> int:
    """The end of the longest run from `members[i]` (A offset, B offset, layer; A offsets ascend) whose
    layers step by one and whose A and B offsets each step by one positive spacing."""
    def step(k: int) -> tuple[int, ...]:
        return tuple(now - before for now, before in zip(members[k], members[k - 1], strict=True))

    j = i + 1
    if j == len(members) or step(j)[2] != 1 or step(j)[1] <= 0:
        return j
    first = step(j)
    while j < len(members) and step(j) == first:
        j += 1
    return j


def lay_out(lora: LoraTensors, dtype: torch.dtype, key: str) -> AdapterWeights:
    """The op's layout, one `LayerRun` per run of layers of a module with one rank and scale:
    lora_A [n, r, in] and lora_B [n, out, r] stacked, and the run's scale (see `_cast` for `dtype`)."""
    runs = []
    for module, layers in _layer_runs({k: (a.shape[0], scale) for k, (a, _, scale) in lora.modules.items()}):
        parts = [lora.modules[layer, module] for layer in layers]
        A = torch.stack([a for a, _, _ in parts])
        B = torch.stack([b for _, b, _ in parts])
        runs.append(_cast(LayerRun(module, layers[0], A, B, parts[0][2]), dtype))
    return _weights(key, runs)


def _cast(run: LayerRun, dtype: torch.dtype) -> LayerRun:
    """`run` itself in fp32; otherwise contiguous copies in `dtype` with the scale folded into B
    (multiplied in fp32), so the host tier holds the compute dtype's bytes."""
    if dtype == run.A.dtype == run.B.dtype:
        return run
    return replace(run, A=run.A.to(dtype, memory_format=torch.contiguous_format),
                   B=(run.B * run.scale).to(dtype, memory_format=torch.contiguous_format), scale=1.0)


def _weights(key: str, runs: list[LayerRun]) -> AdapterWeights:
    return AdapterWeights(key=key, rank=max(run.rank for run in runs), runs=tuple(runs),
                          nbytes=sum(run.A.nbytes + run.B.nbytes for run in runs))


def load_peft_adapter(path: Path, spec: ModelSpec, dtype: torch.dtype, max_rank: int,
                      allow_pickle: bool, key: str = "") -> AdapterWeights:
    """The PEFT LoRA adapter in directory `path`, validated (as `read_peft_lora`) and laid out for the
    op: in fp32, views of the file's data (no copy)."""
    _, plan, flat, offsets = _read(path, spec, max_rank, allow_pickle)
    return _weights(key or str(path), [_cast(run, dtype) for run in _strided_runs(flat, offsets, plan)])
