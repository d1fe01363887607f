"""The gateway's compose service and image agree with the code (Docker cannot run here): every
LORAQ_* name it sets is one the gateway reads, its image installs the gateway extra (no torch), and
its health check and port are the gateway's."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from consumer import cli
from consumer.gateway.settings import FLAGS, TOKENS_ENV, GatewaySettings

ROOT = Path(__file__).resolve().parents[2]


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` / `${VAR}` with an empty environment."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def test_compose_gateway_service():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gateway = compose["services"]["gateway"]
    assert gateway["build"]["dockerfile"] == "Dockerfile.gateway"
    assert gateway["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    env = {k: interpolate(v) for k, v in gateway["environment"].items()}
    known = {flag.env for flag in FLAGS} | {TOKENS_ENV}
    assert set(env) <= known, f"unknown to the gateway: {sorted(set(env) - known)}"
    settings = GatewaySettings.from_args([], env=env)  # every value parses
    assert settings.load_tokens(env) == frozenset()  # no tokens by default: no auth
    port = settings.port
    assert [interpolate(p) for p in gateway["ports"]] == [f"127.0.0.1:{port}:{port}"]  # this machine only by default
    assert f"127.0.0.1:{port}/healthz" in " ".join(gateway["healthcheck"]["test"])
    worker_env = compose["services"]["worker"]["environment"]  # shared names, same values
    for name in ("LORAQ_AMQP_URL", "LORAQ_MODEL", "LORAQ_ADAPTER_ROOT"):
        assert gateway["environment"][name] == worker_env[name]


def test_gateway_image_and_command():
    lines = (ROOT / "Dockerfile.gateway").read_text().splitlines()
    assert 'RUN pip install ".[gateway]"' in lines
    assert 'ENTRYPOINT ["loraq", "gateway"]' in lines
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(dep.startswith("torch") for dep in extras["gateway"])
    assert cli.DELEGATES["gateway"] == "consumer.gateway.app:main"


def test_gateway_never_imports_torch():
    code = ("import sys, consumer.gateway.app; "
            "sys.exit(any(m in sys.modules for m in ('torch', 'transformers')))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
