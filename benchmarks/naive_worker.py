"""A naive PEFT + aio-pika worker, as a user would write one in an afternoon: the baseline that
`loraq bench e2e` (benchmarks/e2e.py) compares loraq with (issue 12, point 4). Not part of the product.

    python -m benchmarks.naive_worker --queue Q --adapter-root DIR [--model embedded] [--batch]

It takes jobs in loraq's wire format (docs/protocol.md; it reads `inputs`, `parameters.adapter_id`,
`max_new_tokens` and `ignore_eos_token`, and decodes greedily) from a quorum queue, answers each on
its `reply_to` with a `result` reply (`generated_text`, `details.generated_tokens`), then acks it.
Adapters are loaded into one PeftModel on first use and kept. Default: one job at a time. `--batch`:
the jobs waiting (up to --max-batch) go into one `generate` with PEFT's mixed-adapter batches
(`adapter_names`, "__base__" for none), left-padded. /readyz on --metrics-port answers 200 once the
model is loaded, as a loraq worker's does, so `WorkerProcess` can run it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import aio_pika
import torch

from benchmarks.common import model_source

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


class NaivePeft:
    """The model, its tokenizer and the adapters loaded so far."""

    def __init__(self, model: str, adapter_root: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source, kwargs, _ = model_source(model)
        self.tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left", **kwargs)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs).eval()
        self.adapter_root = adapter_root
        self.adapters: set[str] = set()

    def adapter_name(self, adapter_id: str | None) -> str:
        if not adapter_id:
            return BASE
        if adapter_id not in self.adapters:
            from peft import PeftModel

            path = str(self.adapter_root / adapter_id)
            if self.adapters:
                self.model.load_adapter(path, adapter_name=adapter_id)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=adapter_id).eval()
            self.adapters.add(adapter_id)
        return adapter_id

    @torch.inference_mode()
    def generate(self, jobs: list[dict]) -> list[tuple[str, int]]:
        """(text, new tokens) per job, all in one `generate`."""
        params = [job.get("parameters") or {} for job in jobs]
        names = [self.adapter_name(p.get("adapter_id")) for p in params]
        new_tokens = [int(p.get("max_new_tokens") or 64) for p in params]
        ignore_eos = all(p.get("ignore_eos_token") for p in params)
        inputs = self.tokenizer([job["inputs"] for job in jobs], return_tensors="pt", padding=True)
        extra: dict[str, Any] = {"adapter_names": names} if self.adapters else {}
        if ignore_eos:
            extra["eos_token_id"] = None  # every row runs to max_new_tokens, as loraq's ignore_eos_token
        out = self.model.generate(**inputs, max_new_tokens=max(new_tokens), do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, **extra)
        results = []
        for generated, n in zip(out[:, inputs["input_ids"].shape[1]:].tolist(), new_tokens, strict=True):
            ids: list[int] = generated[:n]
            if not ignore_eos and self.tokenizer.eos_token_id in ids:
                ids = ids[:ids.index(self.tokenizer.eos_token_id)]
            results.append((str(self.tokenizer.decode(ids, skip_special_tokens=True)), len(ids)))
        return results


async def serve_readyz(ready: asyncio.Event, port: int, host: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" if ready.is_set() else b"HTTP/1.0 503 Not Ready\r\n\r\n")
        await writer.drain()
        writer.close()

    await asyncio.start_server(answer, host, port)


async def run(args: argparse.Namespace) -> None:
    ready = asyncio.Event()
    await serve_readyz(ready, args.metrics_port, args.metrics_host)
    peft = await asyncio.to_thread(NaivePeft, args.model, Path(args.adapter_root))
    connection = await aio_pika.connect_robust(args.amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=args.max_batch)
    queue = await channel.declare_queue(args.queue, durable=True, arguments={"x-queue-type": "quorum"})
    waiting: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(waiting.put)
    ready.set()
    while True:
        messages = [await waiting.get()]
        while args.batch and len(messages) < args.max_batch and not waiting.empty():
            messages.append(waiting.get_nowait())
        jobs = [json.loads(m.body) for m in messages]
        results = await asyncio.to_thread(peft.generate, jobs)  # one thread: torch's pool stays one pool
        for message, job, (text, n) in zip(messages, jobs, results, strict=True):
            body = {"v": 1, "id": message.message_id, "generated_text": text,
                    "details": {"generated_tokens": n}, "adapter_id": (job.get("parameters") or {}).get("adapter_id")}
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), content_type="application/json", type="result",
                                 correlation_id=message.correlation_id), routing_key=message.reply_to or "")
            await message.ack()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.naive_worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queue", required=True)
    ap.add_argument("--adapter-root", required=True)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    ap.add_argument("--batch", action="store_true", help="the waiting jobs in one generate (adapter_names)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--metrics-port", type=int, default=9091)
    ap.add_argument("--metrics-host", default="127.0.0.1")
    asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
