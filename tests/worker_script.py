"""A worker process on the fake engine, for tests that signal or kill real processes.

    python tests/worker_script.py [worker flags] [--fake-step-s S] [--fake-slow ADAPTER=S]
                                  [--fake-fail ADAPTER=error_type[:retryable]]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
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
    engine = FakeEngine(step_s=fake.fake_step_s, max_batch=settings.max_batch, slow=slow,
                        fail=fail)
    try:
        asyncio.run(run_worker(settings, engine))
    finally:
        engine.shutdown(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
