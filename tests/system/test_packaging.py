"""`pip install loraq` (no extras) is the client for backend apps: a fresh venv without system
site-packages gets the client, the wire protocol and `loraq generate`, and no torch.

The package is built from a copy of its sources in a temp dir (pip's in-tree build would write
build/ and *.egg-info into the checkout), with pip's cache there too. Needs the package index."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "consumer", "engine")


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(venv bin dir, a working dir outside the checkout, env) after `pip install <sources>`."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(tmp / "venv")
    bin_dir = tmp / "venv" / ("Scripts" if sys.platform == "win32" else "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_CACHE_DIR=str(tmp / "pip-cache"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    work = tmp / "work"
    work.mkdir()
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(src)], work, env, timeout=900)
    return bin_dir, work, env


def test_plain_install_imports_the_client_without_torch(plain_install) -> None:
    bin_dir, work, env = plain_install
    probe = (
        "import importlib.util, sys\n"
        "import consumer.client, consumer.protocol, engine\n"
        "from consumer import SyncClient\n"
        "from engine import ErrorType, SamplingParams\n"
        "assert consumer.protocol.__file__.startswith(sys.prefix), consumer.protocol.__file__\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
        "loaded = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "print('ok', ErrorType.VALIDATION.value)\n"
    )
    out = _run([str(bin_dir / "python"), "-c", probe], work, env, timeout=120).stdout
    assert out.strip() == "ok validation"


def test_plain_install_runs_loraq_generate_help(plain_install) -> None:
    bin_dir, work, env = plain_install
    out = _run([str(bin_dir / "loraq"), "generate", "--help"], work, env, timeout=120).stdout
    assert "--adapter-id" in out and "--stream" in out


def test_plain_install_says_the_benchmarks_need_a_checkout(plain_install) -> None:
    bin_dir, work, env = plain_install
    out = _run([str(bin_dir / "loraq"), "bench", "--help"], work, env, timeout=120).stdout
    assert "No benchmarks/ folder here" in " ".join(out.split())
    missing = subprocess.run([str(bin_dir / "loraq"), "bench", "engine"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "run from a checkout" in missing.stderr
