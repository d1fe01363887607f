"""The benchmarks' plumbing, without running a benchmark: shared helpers (percentiles, prompts,
random adapters written off the calling thread and accepted by the engine), the e2e bench's worker
flags, overhead report and broker floor, the adapter rotation, and `loraq bench` (its mapping, with
and without a checkout)."""

from __future__ import annotations

import argparse
import math
import threading
from pathlib import Path

import pytest

from benchmarks import common, e2e
from benchmarks.adapters import rotation
from benchmarks.e2e import Run, report_overhead, worker_flags
from consumer import cli
from consumer.protocol import Topology
from consumer.settings import WorkerSettings


def test_percentile_interpolates_between_ranks() -> None:
    assert common.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert common.percentile([1.0, 2.0], 50) == 1.5
    assert common.percentile(list(map(float, range(101))), 99) == 99.0
    assert common.percentile([7.0], 99) == 7.0
    assert math.isnan(common.percentile([], 50))
    assert common.summary([1.0, 3.0]) == {"n": 2, "p50": 2.0, "p99": pytest.approx(2.98), "mean": 2.0}


def test_make_prompts_gives_distinct_prompts_of_the_exact_length() -> None:
    def tokenizer(text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    prompts = common.make_prompts(tokenizer, 5, 40)
    assert [len(p) for p in prompts] == [40] * 5
    assert len({tuple(p) for p in prompts}) == 5


def test_random_adapters_are_written_off_the_calling_thread_and_load(tmp_path: Path, loaded_models,
                                                                     monkeypatch) -> None:
    import torch

    from engine.adapter import load_peft_adapter

    spec = loaded_models("llama").spec
    writers: set[int] = set()
    write_one = common.write_random_adapter

    def recording(*args, **kwargs) -> None:
        writers.add(threading.get_ident())
        write_one(*args, **kwargs)

    monkeypatch.setattr(common, "write_random_adapter", recording)
    common.write_random_adapters(tmp_path, ["a/x", "b/y"], spec, 4, ("q_proj", "down_proj"))
    assert writers and threading.get_ident() not in writers
    for name in ("a/x", "b/y"):
        weights = load_peft_adapter(tmp_path / name, spec, torch.float32, max_rank=8, allow_pickle=False)
        assert weights is not None
    a = (tmp_path / "a/x/adapter_model.safetensors").read_bytes()
    assert a != (tmp_path / "b/y/adapter_model.safetensors").read_bytes()  # seeded by index


def test_rotation_never_repeats_an_adapter_back_to_back() -> None:
    for n in (2, 99, 900):
        plan = rotation(n, 3 * n, first=1)
        assert all(1 <= i <= n for i in plan)
        assert all(a != b for a, b in zip(plan, plan[1:], strict=False))
        assert len(set(plan[:n])) == n  # none repeats within n requests


def _e2e_args(**overrides) -> argparse.Namespace:
    values = dict(amqp_url="amqp://u:p@h:5672/", model="some/model", device="cpu", dtype="float32",
                  max_batch=16, jobs=32, overhead_jobs=48, batch_window_ms=2.5, rank=8, rotation_rank=12,
                  overhead_adapters=40, adapter_slots=32, worker_args="--result-cache-size 7")
    values.update(overrides)
    return argparse.Namespace(**values)


def test_e2e_worker_flags_build_the_in_process_engine_alike(tmp_path: Path) -> None:
    topology = Topology.prefixed("loraq-bench-x")
    settings = WorkerSettings.from_args(worker_flags(_e2e_args(), topology, tmp_path), env={})
    assert settings.topology == topology
    config = settings.engine_config()
    assert (config.model, config.device, config.dtype) == ("some/model", "cpu", "float32")
    assert (config.max_batch, config.max_lora_rank, config.adapter_slots) == (16, 12, 40)
    assert config.adapter_root == str(tmp_path)
    assert (settings.prefetch, settings.batch_window_ms, settings.result_cache_size) == (64, 2.5, 7)


def test_e2e_report_compares_the_paths() -> None:
    def run(path: str, load: str, outside_ms: float) -> Run:
        return Run(path, load, [2.0], [100.0, 200.0], [1.0, 1.0], [outside_ms] * 2, [4, 4],
                   ["a", "b" if path == "engine" else "c"])

    runs = {(p, load): run(p, load, 0.0 if p == "engine" else 3.0)
            for p in ("engine", "rabbitmq") for load in ("burst", "serial")}
    args = _e2e_args(overhead_jobs=2, overhead_adapters=1, rank=4, overhead_new_tokens=4)
    lines, numbers = report_overhead(args, "cpu", runs, [2.0, 2.5, 9.0])
    assert numbers["summary"]["serial_p50_overhead_ms"] == 3.0
    assert numbers["summary"]["broker_floor_p50_ms"] == 2.5
    assert "loraq's own share: +0.5 ms" in "\n".join(lines)
    assert numbers["summary"]["identical_texts_burst"] == "1/2"
    rows = e2e.ratios({"workload": {"jobs": 2}, "overhead": numbers})
    assert [(r.value, r.met) for r in rows] == [(1.0, True), (3.0, True)]  # throughput ratio >= 0.95; 3 ms < 5 ms
    assert "+3.0  < 5: met" in rows[1].line()


async def test_e2e_broker_floor_echo_round_trips() -> None:
    """The e2e bench's broker floor: a bare echo in another process answers through a quorum
    queue, and its queue is gone afterwards."""
    import aio_pika

    from benchmarks.e2e import BrokerFloor
    from tests.amqp_helpers import AMQP_URL

    async with BrokerFloor(AMQP_URL) as floor:
        for _ in range(3):
            await floor.round_trip()
    assert len(floor.round_trips_ms) == 3 and all(t > 0 for t in floor.round_trips_ms)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelClosed):
            await channel.declare_queue(floor.queue, passive=True)


def test_vllm_side_phases_split_prefill_from_a_decode_step() -> None:
    """A batch of t tokens per row takes 2 s of prefill (its first token included) and 0.1 s per
    further token; the slower of two tries never counts."""
    from benchmarks.vllm_side import phases

    slow = iter([True, False, True, False])
    got = phases(lambda tokens: 2.0 + 0.1 * (tokens - 1) + (5.0 if next(slow) else 0.0), new_tokens=32)
    assert got == {"prefill_s": 2.0, "decode_step_ms": pytest.approx(100.0)}


def test_loraq_bench_maps_each_kind_to_a_benchmark_module() -> None:
    import importlib.util

    kinds = {name.removeprefix("bench "): target for name, target in cli.DELEGATES.items()
             if name.startswith("bench ")}
    assert set(kinds) == set(cli.BENCH_HELP)  # every kind has a help line, and every help line a kind
    assert kinds["e2e"] == "benchmarks.e2e:main"  # the one user-path run (overhead, sweep, rotation, naive, ...)
    for target in kinds.values():
        module, _, function = target.partition(":")
        assert importlib.util.find_spec(module) is not None and function == "main", target


def test_loraq_bench_runs_the_checkout_benchmarks(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # not the checkout: found beside the consumer package
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "e2e", "--help"])
    assert exit_.value.code == 0
    assert "usage: loraq bench e2e" in capsys.readouterr().out


def test_loraq_bench_outside_a_checkout_says_where_they_are(tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    def never(name: str) -> None:
        raise AssertionError(f"imported {name}")

    monkeypatch.setattr(cli, "CHECKOUT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.importlib, "import_module", never)
    assert cli.main(["bench", "adapters", "--requests", "1"]) == 2
    assert "run from a checkout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "No benchmarks/ folder here" in capsys.readouterr().out.replace("\n", " ")


def test_benchmarks_are_not_imported_by_the_product() -> None:
    root = Path(__file__).resolve().parents[2]
    for package in ("consumer", "engine"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            assert "from benchmarks" not in text and "import benchmarks" not in text, path
