"""The roofline benchmark's counting (benchmarks/roofline.py): FLOPs and bytes of a decode step
against a hand count for a tiny decoder, the parameter count against a real model's Linear
weights, and the CPU's peak from /proc/cpuinfo. Nothing is timed."""

from __future__ import annotations

import pytest

from benchmarks import roofline
from benchmarks.roofline import Shape

# q, k, v, o: 8x8, 8x4, 8x4, 8x8; gate, up: 8x16; down: 16x8 -> 576 weights a layer
TINY = Shape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)


def test_linear_params_count_every_projection_and_the_vocabulary() -> None:
    assert TINY.module_shapes()["k_proj"] == (8, 4)
    assert roofline.linear_params(TINY) == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 128) + 10 * 8  # 1232
    assert roofline.lora_params(TINY, 2, ("q_proj", "v_proj")) == 2 * 2 * ((8 + 8) + (8 + 4))  # 112


def test_decode_step_flops_against_a_hand_count() -> None:
    flops = roofline.decode_step_flops(TINY, rows=3, context=5, rank=2, targets=("q_proj", "v_proj"))
    assert flops == {"linear": 2 * 3 * 1232,
                     "attention": 3 * 2 * 2 * (2 * 4 * 5 + 2 * 4 * 5),  # rows x layers x heads x (q.K + w.V)
                     "lora": 2 * 3 * 112,
                     "total": 7392 + 960 + 672}
    base = roofline.decode_step_flops(TINY, rows=3, context=5)
    assert base["lora"] == 0 and base["total"] == 7392 + 960


def test_decode_step_bytes_against_a_hand_count() -> None:
    moved = roofline.decode_step_bytes(TINY, rows=3, context=5, rank=2, targets=("q_proj", "v_proj"), adapters=3)
    assert moved == {"weights": 1232 * 4,
                     "kv": 3 * 5 * 2 * 2 * 1 * 4 * 4,  # rows x context x layers x (K, V) x kv_heads x head_dim x 4 B
                     "lora": 3 * 112 * 4,
                     "total": 4928 + 960 + 1344}
    assert roofline.decode_step_bytes(TINY, rows=3, context=5)["lora"] == 0


def test_shape_from_a_config_counts_the_linear_weights_of_the_model() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert roofline.linear_params(Shape.from_config(config)) == linear


@pytest.mark.parametrize(("vendor", "family", "flags", "expected"), [
    ("AuthenticAMD", 25, {"avx", "avx2", "fma", "avx512f"}, 32),  # Zen 4: AVX-512 on 256-bit pipes
    ("AuthenticAMD", 26, {"avx", "avx2", "fma", "avx512f"}, 64),  # Zen 5
    ("AuthenticAMD", 23, {"avx", "avx2", "fma"}, 32),
    ("GenuineIntel", 6, {"avx", "avx2", "fma", "avx512f"}, 64),
    ("GenuineIntel", 6, {"avx", "avx2", "fma"}, 32),
    ("GenuineIntel", 6, {"avx"}, 16),
    ("GenuineIntel", 6, {"sse2"}, 8),
])
def test_fp32_flops_per_cycle_from_the_cpu_flags(vendor: str, family: int, flags: set[str], expected: int) -> None:
    assert roofline.fp32_flops_per_cycle(vendor, family, flags) == expected


def test_parse_cpuinfo_reads_the_first_processor() -> None:
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel name\t: AMD EPYC\n"
            "cpu MHz\t\t: 2596.130\nflags\t\t: fpu avx2 fma avx512f\n\n"
            "processor\t: 1\nvendor_id\t: Other\ncpu MHz\t\t: 1.0\n")
    cpu = roofline.parse_cpuinfo(text)
    assert (cpu.vendor, cpu.family, cpu.model, cpu.mhz) == ("AuthenticAMD", 25, "AMD EPYC", 2596.13)
    assert {"avx2", "fma", "avx512f"} <= cpu.flags
    assert roofline.peak_gflops(2, 2.6, 32) == pytest.approx(166.4)
    assert roofline.parse_cpuinfo("processor\t: 0\n").mhz is None
