"""Smoke runs of the issue-12 benchmarks at tiny sizes on a tiny model: every scenario runs end to end
through the broker (a real `loraq worker` and the naive PEFT worker as subprocesses) and reports its
ratios. No timing is asserted: these sizes measure nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import adapter_load, user_path


@pytest.mark.slow
def test_user_path_runs_every_scenario_through_the_broker(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "numbers.json"
    jobs, new_tokens, rotation_jobs = 3, 2, 3
    assert user_path.main([
        "--model", str(tiny_llama), "--jobs", str(jobs), "--rank", "4", "--prompt-tokens", "8",
        "--new-tokens", str(new_tokens), "--repeats", "1", "--rotation-sets", "1,2",
        "--rotation-jobs", str(rotation_jobs), "--rotation-rank", "4", "--rotation-new-tokens", "2",
        "--max-batch", "4", "--json", str(out)]) == 0
    numbers = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for line in ("adapters / base:", "p50 with 2 / with 1:", "loraq / naive:", "[target"):
        assert line in printed
    staggered = numbers["staggered"]
    assert staggered["base_tok_s"] > 0 and staggered["adapters_tok_s"] > 0
    assert staggered["ratio"] == pytest.approx(staggered["adapters_tok_s"] / staggered["base_tok_s"], rel=1e-2)
    rotation = numbers["rotation"]
    assert set(rotation["sets"]) == {"1", "2"} and all(s["jobs"] == rotation_jobs for s in rotation["sets"].values())
    assert rotation["p50_ratio"] > 0
    naive = numbers["naive"]
    assert naive["loraq_tok_s"] > 0 and naive["naive_tok_s"] > 0
    # the naive worker applies each job's adapter as loraq does: the same greedy text, row by row
    assert naive["identical_texts"] == f"{jobs}/{jobs}"


def test_user_path_reports_ratios_of_what_it_measured() -> None:
    def reply(tokens: int, sent: float, received: float, **timings: float) -> user_path.Reply:
        return user_path.Reply(sent, received, {"generated_text": "x", "details": {"generated_tokens": tokens},
                                                "timings": timings})

    base = user_path.Burst("loraq", "base", 2.0, [reply(10, 0.0, 1.0)] * 4)  # 20 tok/s
    adapters = user_path.Burst("loraq", "adapters", 2.5, [reply(10, 0.0, 1.0)] * 4)  # 16 tok/s
    lines, numbers = user_path.report_staggered({"base": [base], "adapters": [adapters]})
    assert numbers["ratio"] == 0.8 and "[target >= 0.95: missed]" in "\n".join(lines)
    one = [reply(1, 0.0, 0.100, queue_ms=1.0, adapter_load_ms=0.0)] * 3
    many = [reply(1, 0.0, 0.104, queue_ms=2.0, adapter_load_ms=3.0)] * 3
    lines, numbers = user_path.report_rotation({1: one, 1000: many})
    assert numbers["p50_ratio"] == 1.04 and numbers["sets"]["1000"]["adapter_load_ms_p50"] == 3.0
    assert "[target <= 1.05: met]" in "\n".join(lines)


def test_adapter_load_compares_loads_with_plain_reads(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "load.json"
    assert adapter_load.main(["--model", str(tiny_llama), "--adapters", "3", "--rounds", "1",
                              "--json", str(out)]) == 0
    numbers = json.loads(out.read_text())
    assert numbers["adapter_mb"] > 0
    for step in ("read", "load", "slot", "load_slot"):
        assert numbers[step]["best_mb_s"] > 0 and numbers[step]["median_ms"] > 0
    assert numbers["ratio_load_slot_vs_read_median"] > 0
    assert "load + slot MB/s / read MB/s" in capsys.readouterr().out
