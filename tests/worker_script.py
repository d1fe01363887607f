"""A worker process on the fake engine, for tests that signal or kill real processes.

    python tests/worker_script.py [worker flags] [--fake-step-s S] [--fake-slow ADAPTER=S]
                                  [--fake-fail ADAPTER=error_type[:retryable]] [--fake-fail-times ADAPTER=N]
                                  [--fake-build-s S]

The fake engine is built the way the real one is (consumer.service.run_worker's `build`, after the
metrics server is up), taking --fake-build-s to "load".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumer.logging import configure_logging  # noqa: E402
from consumer.service import run_worker  # noqa: E402
from consumer.settings import WorkerSettings  # noqa: E402
from engine.request import EngineError, ErrorType  # noqa: E402
from tests.fake_engine import FakeEngine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fake-step-s", type=float, default=0.001)
    parser.add_argument("--fake-slow", action="append", default=[])
    parser.add_argument("--fake-fail", action="append", default=[])
    parser.add_argument("--fake-fail-times", action="append", default=[])
    parser.add_argument("--fake-build-s", type=float, default=0.0)
    fake, rest = parser.parse_known_args()
    settings = WorkerSettings.from_args(rest)
    configure_logging(settings.log_level)
    slow = {k: float(v) for k, v in (s.split("=", 1) for s in fake.fake_slow)}
    fail = {}
    for spec in fake.fake_fail:
        adapter, kind = spec.split("=", 1)
        error_type, _, retryable = kind.partition(":")
        fail[adapter] = EngineError(ErrorType(error_type), f"fake {error_type} on {adapter}",
                                    retryable=retryable == "retryable")
    fail_times = {k: int(v) for k, v in (s.split("=", 1) for s in fake.fake_fail_times)}

    def build(settings: WorkerSettings) -> FakeEngine:
        time.sleep(fake.fake_build_s)  # the model "loads"
        return FakeEngine(step_s=fake.fake_step_s, max_batch=settings.max_batch, slow=slow,
                          fail=fail, fail_times=fail_times)

    asyncio.run(run_worker(settings, build=build))  # which shuts the engine down
    return 0


if __name__ == "__main__":
    sys.exit(main())
