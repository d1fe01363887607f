#!/usr/bin/env bash
# Install loraq with its test extras and run the whole test suite (needs RabbitMQ at 127.0.0.1:5672).
# Arguments go to pytest (e.g. tests/consumer -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh worker,gateway,test
python -m pip install -q --no-deps lorax-client==0.6.3   # tests/gateway: LoRAX's client (its code needs only the test extra's requests, aiohttp, pydantic)
python -m pytest -q "$@"
