"""Smoke runs of the issue-12 benchmarks at tiny sizes on a tiny model: `loraq bench e2e` runs every
scenario end to end through the broker (a real `loraq worker` and the naive PEFT workers as
subprocesses), reports its ratios and draws its picture. No timing is asserted: these sizes measure
nothing. Also the user-path scenarios' plan and reports on synthetic replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import adapter_load, e2e, user_path
from benchmarks.user_path import LORAQ, PEFT_BATCH, PEFT_SERIAL


@pytest.mark.slow
def test_e2e_runs_every_scenario_through_the_broker(tiny_llama: Path, tmp_path: Path, capsys,
                                                   restore_logging) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "numbers.json", tmp_path / "picture.png"
    jobs, rotation_jobs = 3, 3
    assert e2e.main([
        "--model", str(tiny_llama), "--jobs", str(jobs), "--rank", "4", "--prompt-tokens", "8",
        "--new-tokens", "2", "--repeats", "1", "--sweep-adapters", "0,1,3", "--rotation-sets", "1,2",
        "--rotation-jobs", str(rotation_jobs), "--rotation-rank", "4", "--rotation-new-tokens", "2",
        "--overhead-jobs", "3", "--overhead-serial-jobs", "1", "--overhead-adapters", "1", "--overhead-new-tokens", "2",
        "--max-batch", "4", "--json", str(out), "--plot", str(png)]) == 0
    numbers = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for line in ("ratios measured side by side", "through the broker / engine alone", "distinct adapters / base model",
                 "rotation: p50 over 2 / over 1 adapters, loraq", "loraq / naive PEFT worker one job at a time",
                 "loraq / naive PEFT worker adapter_names batches", ">= 10: "):
        assert line in printed
    assert numbers["overhead"]["summary"]["identical_texts_burst"] == "3/3"
    staggered = numbers["staggered"]
    assert staggered["ratio"] == pytest.approx(staggered["adapters_tok_s"] / staggered["base_tok_s"], rel=1e-2)
    assert {system: set(by_k) for system, by_k in numbers["sweep"]["tok_s"].items()} == {
        LORAQ: {"0", "1", "3"}, PEFT_BATCH: {"0", "1", "3"}}
    assert numbers["sweep"]["tok_s"][LORAQ]["3"] == staggered["adapters_tok_s"]  # the same cell, measured once
    for system in (LORAQ, PEFT_SERIAL):
        rotation = numbers["rotation"]["systems"][system]
        assert {n: s["jobs"] for n, s in rotation["sets"].items()} == {"1": rotation_jobs, "2": rotation_jobs}
        assert rotation["p50_ratio"] > 0
    # the naive workers apply each job's adapter as loraq does: the same greedy text, row by row
    for system in (PEFT_SERIAL, PEFT_BATCH):
        assert numbers["naive"][system]["identical_texts"] == f"{jobs}/{jobs}"
    assert sum(r["met"] is None for r in numbers["ratios"]) == 2  # no target: PEFT's rotation, the batch ratio
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_scenarios_share_their_bursts_and_take_turns() -> None:
    targets = {name: user_path.Target(name, "", name) for name in (LORAQ, PEFT_BATCH, PEFT_SERIAL)}
    cells = user_path.cells(["staggered", "sweep", "naive"], targets, 4, [0, 1, 4])
    assert [(t.name, k) for t, k in cells] == [
        (LORAQ, 0), (PEFT_BATCH, 0), (LORAQ, 1), (PEFT_BATCH, 1), (LORAQ, 4), (PEFT_BATCH, 4), (PEFT_SERIAL, 4)]
    assert [(t.name, k) for t, k in user_path.cells(["staggered"], targets, 4, [1])] == [(LORAQ, 0), (LORAQ, 4)]
    assert user_path.cell_jobs(["p0", "p1", "p2"], ["a", "b"], 3, 2) == [("p0", "a"), ("p1", "b"), ("p2", "a")]
    assert user_path.cell_jobs(["p0", "p1"], ["a"], 2, 0) == [("p0", None), ("p1", None)]


def _reply(tokens: int, received: float, text: str = "x", **timings: float) -> user_path.Reply:
    body = {"generated_text": text, "details": {"generated_tokens": tokens}}
    return user_path.Reply(0.0, received, {**body, "timings": timings} if timings else body)


def test_user_path_reports_what_it_measured() -> None:
    def burst(wall_s: float, text: str = "x") -> user_path.Burst:
        return user_path.Burst(wall_s, [_reply(10, 1.0, text)] * 4)  # 40 tokens

    bursts = {(LORAQ, 0): [burst(2.0)], (LORAQ, 4): [burst(2.5)], (PEFT_SERIAL, 4): [burst(25.0)],
              (PEFT_BATCH, 4): [burst(10.0, "y")], (PEFT_BATCH, 0): [burst(8.0)]}
    staggered = user_path.staggered_numbers(bursts, 4)
    assert (staggered["base_tok_s"], staggered["adapters_tok_s"], staggered["ratio"]) == (20.0, 16.0, 0.8)
    naive = user_path.naive_numbers(bursts, 4)
    assert naive[PEFT_SERIAL] == {"tok_s": 1.6, "ratio": 10.0, "identical_texts": "4/4"}
    assert naive[PEFT_BATCH] == {"tok_s": 4.0, "ratio": 4.0, "identical_texts": "0/4"}
    lines, sweep = user_path.report_sweep(bursts, [0, 4], 4, 10, "rank-4 adapters")
    assert sweep["tok_s"] == {LORAQ: {"0": 20.0, "4": 16.0}, PEFT_BATCH: {"0": 5.0, "4": 4.0}}
    assert lines[-1].split() == ["4", "16.0", "4.0", "4.00"]

    loraq = {1: [_reply(1, 0.100, queue_ms=1.0, adapter_load_ms=0.0)] * 3,
             1000: [_reply(1, 0.104, queue_ms=2.0, adapter_load_ms=3.0)] * 3}
    peft = {1: [_reply(1, 0.200)] * 3, 1000: [_reply(1, 0.300)] * 3}
    lines, rotation = user_path.report_rotation({LORAQ: loraq, PEFT_SERIAL: peft}, 10, "rank-8 adapters")
    assert rotation["systems"][LORAQ]["p50_ratio"] == 1.04 and rotation["systems"][PEFT_SERIAL]["p50_ratio"] == 1.5
    assert rotation["systems"][LORAQ]["sets"]["1000"]["adapter_load_ms_p50"] == 3.0
    assert "queue_ms_p50" not in rotation["systems"][PEFT_SERIAL]["sets"]["1"]  # the naive worker has no timings
    assert lines[3].split()[-1] == "2.88"  # PEFT / loraq p50 over 1000: 300 / 104 ms

    rows = {r.name: r for r in e2e.ratios({"workload": {"jobs": 4}, "staggered": staggered, "naive": naive,
                                           "rotation": rotation})}
    assert rows["staggered: 4 distinct adapters / base model, tok/s"].met is False
    assert rows["rotation: p50 over 1000 / over 1 adapters, loraq"].met is True
    assert rows[f"rotation: p50 over 1000 / over 1 adapters, {PEFT_SERIAL}"].met is None  # no target
    assert rows["loraq / naive PEFT worker one job at a time, tok/s"].met is True  # 10 >= 10
    assert rows["loraq / naive PEFT worker adapter_names batches, tok/s"].to_json()["target"] is None
    assert ">= 0.95: missed" in rows["staggered: 4 distinct adapters / base model, tok/s"].line()


def test_adapter_load_compares_loads_with_plain_reads(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "load.json"
    assert adapter_load.main(["--model", str(tiny_llama), "--adapters", "3", "--rounds", "1",
                              "--json", str(out)]) == 0
    numbers = json.loads(out.read_text())
    assert numbers["adapter_mb"] > 0
    for memory in ("reused", "fresh"):
        for step in ("read", "load", "slot", "load_slot"):
            assert numbers[memory][step]["best_mb_s"] > 0 and numbers[memory][step]["median_ms"] > 0
        assert numbers[memory]["ratio_load_slot_vs_read_median"] > 0 < numbers[memory]["ratio_load_vs_read_median"]
    out = capsys.readouterr().out
    assert "memory reused" in out and "memory fresh" in out and "load + slot MB/s / read MB/s" in out
