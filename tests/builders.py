"""Small builders for tests: tiny random base models (Llama, Mistral, Qwen2) saved as HF dirs with
a byte-level tokenizer and a chat template, and PEFT LoRA adapters trained by nobody (random B,
so every adapter changes the output) saved in PEFT format. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch

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


def make_adapter(model_dir: Path, out_dir: Path, *, r: int = 8, alpha: float = 16,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), use_rslora: bool = False,
                 rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                 seed: int = 1, scale: float = 0.1, **extra) -> Path:
    """A PEFT LoRA adapter for the model in model_dir, with random A and B (B is 0 at PEFT init,
    which would make the adapter a no-op), saved in PEFT format. `extra` goes to LoraConfig."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                     lora_dropout=0.0, task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def read_adapter_config(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())


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
