"""Publish one loraq job with plain AMQP (pika), not the loraq client.

Anything that speaks AMQP 0-9-1 can do this (wire protocol v1): a JSON (or msgpack) map on
exchange `loraq` with routing key `generate`; the replies come to `reply_to`, `type` says which.

    pip install pika
    python examples/publish_pika.py "Write a haiku about queues" --adapter-id demo/pirate --stream
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

import pika


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt")
    p.add_argument("--adapter-id", default=None, help="omit for the base model alone")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stream", action="store_true", help="print token messages as they arrive")
    p.add_argument("--amqp-url", default=os.environ.get("LORAQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    p.add_argument("--exchange", default="loraq")
    p.add_argument("--routing-key", default="generate")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds without a reply before giving up")
    args = p.parse_args(argv)

    conn = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    try:
        return run(conn.channel(), args)
    finally:
        conn.close()


def run(ch: pika.adapters.blocking_connection.BlockingChannel, args: argparse.Namespace) -> int:
    ch.confirm_delivery()  # basic_publish now waits for the broker and raises if unroutable
    # A private reply queue: server-named, deleted when this connection closes.
    reply_queue = ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue

    job_id = str(uuid.uuid4())
    body = {
        "v": 1,
        "inputs": args.prompt,
        "parameters": {"adapter_id": args.adapter_id, "max_new_tokens": args.max_new_tokens},
        "stream": args.stream,
    }
    props = pika.BasicProperties(
        content_type="application/json",
        message_id=job_id,
        correlation_id=job_id,
        reply_to=reply_queue,
        delivery_mode=2,
    )
    try:
        ch.basic_publish(args.exchange, args.routing_key, json.dumps(body).encode(), props, mandatory=True)
    except (pika.exceptions.UnroutableError, pika.exceptions.ChannelClosedByBroker):
        # no queue bound, or (404) not even the exchange: no worker has declared the topology
        print(f"unroutable: no queue is bound to exchange {args.exchange!r} with key {args.routing_key!r}"
              " (is a worker running?)", file=sys.stderr)
        return 2

    # Replies: `token` messages (stream only), then exactly one `result` or `error`.
    for method, props, reply in ch.consume(reply_queue, auto_ack=True, inactivity_timeout=args.timeout):
        if method is None:
            print(f"timed out after {args.timeout}s", file=sys.stderr)
            return 3
        if props.correlation_id != job_id:
            continue  # not ours
        msg = json.loads(reply)
        if props.type == "token":
            print(msg["token"]["text"], end="", flush=True)
        elif props.type == "result":
            print("" if args.stream else msg["generated_text"])
            print(json.dumps({"details": msg["details"], "timings": msg["timings"]}), file=sys.stderr)
            return 0
        elif props.type == "error":
            print(f"error {msg['error_type']} (retryable={msg['retryable']}): {msg['error']}", file=sys.stderr)
            return 1
    return 3


if __name__ == "__main__":
    sys.exit(main())
