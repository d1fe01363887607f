"""The GPU acceptance run's dry mode runs end to end on CPU (tiny shapes, Triton's interpreter), so
scripts/gpu_check.sh is known to work before a GPU machine is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_writes_every_section(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "OUT": str(tmp_path / "report")}  # the report directory, as on the device machine
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    sections = report["sections"]
    assert list(sections) == ["env", "tests", "peft", "op", "decode", "load"]
    assert all(s["status"] == "ok" for s in sections.values()), {k: s["status"] for k, s in sections.items()}
    assert sections["env"]["result"]["backends"] == ["torch", "triton"]
    pairs = [row["pair"] for row in sections["peft"]["result"]["rows"]]
    assert "llama/loraq triton vs peft bf16" in pairs and "llama/peft bf16 vs peft fp32" in pairs
    op_rows = sections["op"]["result"]["rows"]
    assert op_rows and all(row["torch_ratio"] > 0 and row["triton_ratio"] > 0 for row in op_rows)
    decode = sections["decode"]["result"]
    assert decode["torch"]["ratio"] > 0 and decode["triton"]["ratio"] > 0
    assert any(v["GB_per_s"] > 0 for k, v in sections["load"]["result"].items() if isinstance(v, dict) and "ms" in v)
    markdown = (tmp_path / "report" / "gpu_check.md").read_text()
    assert "## decode: ok" in markdown and "| module | layout | dense_ms |" in markdown


def test_unknown_section_is_refused():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--sections", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown sections" in proc.stderr
