"""Small builders for tests: tiny random base models (Llama, Mistral, Qwen2) saved as HF dirs with
a byte-level tokenizer and a chat template, PEFT LoRA adapters trained by nobody (random B, so
every adapter changes the output), stand-ins of the hub's cache and of the hub itself, a helper
that runs requests through an engine, and an engine with adapters and a running worker for the
system tests. Nothing is downloaded. (Engines for the engine tests: the `make_engine` fixture,
tests/engine/conftest.py.)"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from consumer.settings import WorkerSettings
from consumer.worker import Worker
from engine.config import LORA_MODULE_PARENT, LORA_MODULES, EngineConfig
from engine.engine import Engine
from engine.model_loader import ModelSpec

ARCHS = ("llama", "mistral", "qwen2")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(out_dir: Path):
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + 3 specials. Encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_model(out_dir: Path, arch: str = "llama", *, layers: int = 2, seed: int = 0,
                    hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                    max_positions: int = 512) -> Path:
    """A tiny random causal LM of `arch` (llama | mistral | qwen2) saved to out_dir (safetensors)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    common = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    cfg = {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common),
    }[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so tokens differ between rows
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir)
    return out_dir


def model_spec(model_dir: Path) -> ModelSpec:
    """The ModelSpec of a saved model dir, from its config.json alone (no weights loaded)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return ModelSpec(cfg["model_type"], cfg["num_hidden_layers"], h, shapes, Path(model_dir).name)


def make_adapter(base: Path | ModelSpec, out_dir: Path, *, r: int = 8, alpha: float = 16,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), use_rslora: bool = False, seed: int = 1,
                 scale: float = 0.1, fill: float | None = None, **peft_options) -> Path:
    """A PEFT-format LoRA adapter for `base` (a saved model dir, or its ModelSpec) with random A and B
    (times `scale`; PEFT would start B at 0, a no-op adapter); `fill`: every lora_A value instead,
    so tests can tell versions apart. Written straight to safetensors (tests write hundreds), each
    file replaced atomically, as the README asks operators to.

    `peft_options` (rank_pattern, alpha_pattern, layers_to_transform, use_dora, ...: LoraConfig
    fields) and targets outside LORA_MODULES are PEFT's to interpret: PEFT itself then builds and
    saves the adapter (`base` must be a model dir), so the modules and ranks they select are
    PEFT's answer, not a copy of ours."""
    out_dir = Path(out_dir)
    if peft_options or not set(targets) <= set(LORA_MODULES):
        assert fill is None and not isinstance(base, ModelSpec), "PEFT builds it from the model dir"
        return _peft_made_adapter(base, out_dir, r=r, alpha=alpha, targets=targets, use_rslora=use_rslora,
                                  seed=seed, scale=scale, **peft_options)
    spec = base if isinstance(base, ModelSpec) else model_spec(base)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for m in targets:
            fan_in, fan_out = spec.module_shapes[m]
            prefix = f"base_model.model.model.layers.{layer}.{LORA_MODULE_PARENT[m]}.{m}"
            a = torch.randn(r, fan_in, generator=g) * scale if fill is None else torch.full((r, fan_in), float(fill))
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * scale
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "target_modules": list(targets), "use_rslora": use_rslora, "lora_dropout": 0.0, "bias": "none"}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors.tmp"))
    (out_dir / "adapter_config.json.tmp").write_text(json.dumps(config))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.replace(out_dir / f"{name}.tmp", out_dir / name)
    return out_dir


def _peft_made_adapter(model_dir: Path, out_dir: Path, *, r: int, alpha: float, targets: tuple[str, ...],
                       use_rslora: bool, seed: int, scale: float, **peft_options) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                     lora_dropout=0.0, task_type="CAUSAL_LM", **peft_options)
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def hub_cache_standin(cache: Path, repo: str, commit: str, files: Path) -> Path:
    """Lay out `repo` (the files in `files`) as huggingface_hub's own cache does: blobs,
    snapshots/<commit> symlinks, refs/main. Returns the snapshot dir."""
    base = Path(cache) / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir(exist_ok=True)
    for f in Path(files).iterdir():
        blob = base / "blobs" / f"{commit[:12]}-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return snap


class FakeHub:
    """A stand-in for the Hugging Face hub behind `huggingface_hub.snapshot_download` (tests
    monkeypatch it with `hub.snapshot_download`): repos of adapter files, private ones readable
    with their owner's token only. `token=None` is the worker's own login (`worker_token`),
    `False` no credentials. Like the real function it downloads into `cache_dir` in the hub's
    cache layout and, when the hub refuses the token (401), falls back to a snapshot already in
    that cache: the behaviour that makes one shared cache leak private adapters."""

    def __init__(self, worker_token: str | None = None) -> None:
        self.worker_token = worker_token
        self.repos: dict[str, tuple[Path, str | None, str]] = {}  # repo -> (files, owner's token, commit)
        self.calls: list[tuple[str, str | bool | None]] = []  # (repo, token as passed)

    def add(self, repo: str, files: Path, private_to: str | None = None, commit: str = "c" * 40) -> None:
        self.repos[repo] = (Path(files), private_to, commit)

    def snapshot_download(self, repo_id: str, *, revision: str | None = None, cache_dir, token=None,
                          local_files_only: bool = False, **_) -> str:
        import httpx2
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

        self.calls.append((repo_id, token))
        storage = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
        ref = storage / "refs" / (revision or "main")
        cached = storage / "snapshots" / (ref.read_text() if ref.is_file() else revision or "-")
        if local_files_only:
            if cached.is_dir():
                return str(cached)
            raise LocalEntryNotFoundError("not in the cache, and offline")
        files, owner, commit = self.repos.get(repo_id, (None, None, ""))
        sent = self.worker_token if token is None else (None if token is False else token)
        if files is not None and (owner is None or sent == owner):
            snap = storage / "snapshots" / commit
            if not snap.is_dir():
                hub_cache_standin(cache_dir, repo_id, commit, files)
            return str(snap)
        if cached.is_dir():  # refused, but cached: snapshot_download serves the cache
            return str(cached)
        response = httpx2.Response(401, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise RepositoryNotFoundError("401: repository not found or not accessible", response=response)


def run_requests(engine, requests, timeout: float = 60.0, on_token=None) -> dict:
    """Submit all requests, wait for every on_finish; request id -> outcome. Fails on a second
    on_finish for one request."""
    outcomes: dict = {}
    done = threading.Event()
    lock = threading.Lock()

    def finish(outcome) -> None:
        with lock:
            assert outcome.request_id not in outcomes, f"two on_finish for {outcome.request_id}"
            outcomes[outcome.request_id] = outcome
            if len(outcomes) == len(requests):
                done.set()

    for request in requests:
        engine.submit(request, on_token, finish)
    assert done.wait(timeout), f"only {len(outcomes)}/{len(requests)} requests finished"
    return outcomes


@contextmanager
def engine_with_adapters(root: Path, adapters: dict[str, dict], seed: int = 1, **config) -> Iterator[Engine]:
    """An Engine (cpu, fp32, `config` on top) on a tiny random Llama written to root/model, with
    `adapters` (id -> make_adapter kwargs, seeds seed, seed + 1, ...) under root/adapters; shut
    down on exit."""
    model = make_tiny_model(root / "model")
    for i, (adapter_id, kw) in enumerate(adapters.items()):
        make_adapter(model, root / "adapters" / adapter_id, seed=seed + i, **kw)
    engine = Engine(EngineConfig(model=str(model), adapter_root=str(root / "adapters"), device="cpu",
                                 dtype="float32", **config))
    try:
        yield engine
    finally:
        engine.shutdown(5)


@asynccontextmanager
async def running_worker(settings: WorkerSettings, engine: Engine) -> AsyncIterator[Worker]:
    """A Worker on `engine`, started; drained on exit."""
    worker = Worker(settings, engine)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.drain()


def peft_per_arch(model_dirs: dict, tmp_path_factory, adapters: dict, seed: int, prefix: str):
    """For a module-scoped fixture: get(arch) -> (adapter root, PeftModel with every adapter of
    `adapters` loaded, on its own copy of the base), built on first use and kept."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"{prefix}_{arch}")
            cache[arch] = (root, peft_with_adapters(model_dirs[arch], root, adapters, seed=seed))
        return cache[arch]

    return get


def peft_with_adapters(model_dir: Path, root: Path, adapters: dict[str, dict], seed: int, scale: float = 0.15):
    """The reference the engine is checked against: `adapters` (name -> make_adapter kwargs) written
    under `root` (seeds seed, seed + 1, ...), all loaded into one PeftModel on its own fp32 copy of the
    base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for i, (name, kw) in enumerate(adapters.items()):
        make_adapter(model_dir, root / name, seed=seed + i, scale=scale, **kw)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    first, *rest = adapters
    peft = PeftModel.from_pretrained(base, root / first, adapter_name=first)
    for name in rest:
        peft.load_adapter(root / name, adapter_name=name)
    return peft.eval()


def peft_logits(peft, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: PEFT with `adapter` (the base model for None) over the whole sequence, no cache."""
    with torch.no_grad():
        if adapter is None:
            with peft.disable_adapter():
                return peft(torch.tensor([ids])).logits[0]
        peft.set_adapter(adapter)
        return peft(torch.tensor([ids])).logits[0]
