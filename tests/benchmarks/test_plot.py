"""benchmarks/plot.py: the e2e benchmark's picture, drawn from a run's JSON (here a small hand-written
one), and a clear message when matplotlib is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import plot


def _numbers() -> dict:
    def sets(p50s: list[float]) -> dict:
        return {str(n): {"jobs": 3, "p50_ms": p50, "p99_ms": 1.3 * p50} for n, p50 in zip((1, 10, 1000), p50s,
                                                                                           strict=True)}

    return {"model": "tiny", "cores": 2, "date": "2026-12-01 10:00",
            "sweep": {"jobs": 4, "new_tokens": 4, "adapters": "rank-4 adapters on q_proj",
                      "tok_s": {"loraq": {"0": 200.0, "1": 190.0, "2": 185.0, "4": 180.0},
                                "peft-batch": {"0": 90.0, "1": 80.0, "2": 70.0, "4": 60.0}}},
            "rotation": {"jobs": 3, "new_tokens": 4, "adapters": "rank-4 adapters on q_proj",
                         "systems": {"loraq": {"sets": sets([400.0, 405.0, 410.0]), "p50_ratio": 1.025},
                                     "peft-serial": {"sets": sets([500.0, 700.0, 900.0]), "p50_ratio": 1.8}}}}


def test_plot_draws_a_png_from_a_runs_json(tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    results, out = tmp_path / "results.json", tmp_path / "out.png"
    results.write_text(json.dumps(_numbers()))
    assert plot.main([str(results), str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert f"wrote {out}" in capsys.readouterr().out


def test_plot_needs_the_sweep_and_the_rotation(tmp_path: Path) -> None:
    numbers = _numbers()
    del numbers["rotation"]
    with pytest.raises(ValueError, match="no rotation"):
        plot.draw(numbers, tmp_path / "out.png")


def test_plot_without_matplotlib_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ModuleNotFoundError
    with pytest.raises(SystemExit, match=r"pip install 'loraq\[plot\]'"):
        plot.require_matplotlib()
