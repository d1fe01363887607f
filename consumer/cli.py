"""`loraq` command line: generate through the broker, run the worker, benchmarks, health check.

    loraq generate "Hello" --adapter-id demo/pirate [--stream] [--json]
    loraq generate "Spam? Buy now!" --response-format-json schema.json --json
    loraq worker --model embedded --adapter-root ./adapters     # flags: loraq worker --help
    loraq bench engine|e2e|adapters|adapter-load|gateway|structured ...
    loraq health                                                  # exit 0 when the worker is healthy
    loraq gateway --port 8080                                     # HTTP: LoRAX and OpenAI APIs
    loraq demo                                                    # worker + demo adapters + jobs

`worker`, `health`, `demo` and `bench` hand their arguments to the module that owns them, imported only
then: `generate` never loads the worker or torch. The benchmarks live in the repository's top-level
`benchmarks/` folder, not in the installed package: `loraq bench` runs them from a checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DELEGATES = {  # subcommand -> "module:function" that runs it with the remaining argv
    "worker": "consumer.service:main",
    "health": "consumer.service:health_main",
    "demo": "consumer.demo:main",
    "gateway": "consumer.gateway.app:main",
    "bench engine": "benchmarks.engine:main",
    "bench e2e": "benchmarks.e2e:main",
    "bench adapters": "benchmarks.adapters:main",
    "bench gateway": "benchmarks.gateway:main",
    "bench structured": "benchmarks.structured:main",
    "bench adapter-load": "benchmarks.adapter_load:main",
}
CHECKOUT = Path(__file__).resolve().parent.parent  # the repository, when run from a checkout
BENCH_HELP = {
    "engine": "engine throughput: loraq vs transformers vs PEFT, base and many adapters",
    "e2e": "through RabbitMQ as users publish: broker overhead against the engine alone, staggered "
           "arrivals, tokens/s against adapters per batch, cold rotation, a naive PEFT worker; --plot",
    "adapters": "latency at 1/100/1000 adapters in rotation, loraq vs PEFT; cold loads and prefetch",
    "gateway": "latency and jobs/s through the HTTP gateway against publishing to the broker",
    "structured": "step time with and without grammar-constrained rows (response_format); validity",
    "adapter-load": "MB/s of an adapter load into its slot against a plain read of its files",
}
CONTENT_TYPES = {"msgpack": "application/msgpack", "json": "application/json"}


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraq", description="Serve many LoRA adapters on one base LLM, fed by RabbitMQ.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="publish one job and print its text",
                         description="Publish one job (protocol v1) and print the generated text.")
    gen.add_argument("prompt", help="the prompt (with --chat: the user message)")
    gen.add_argument("--adapter-id", default=None, help="adapter to use; omit for the base model")
    gen.add_argument("--adapter-source", choices=("local", "hub"), default=None,
                     help="default: the worker's")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a chat message (the model's chat template applies)")
    gen.add_argument("--system", default=None, help="system message (implies --chat)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--typical-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--frequency-penalty", type=float, default=None, help="in [-2, 2] (LoRAX's)")
    gen.add_argument("--presence-penalty", type=float, default=None, help="in [-2, 2] (LoRAX's)")
    gen.add_argument("--ignore-eos-token", action="store_true",
                     help="generate max_new_tokens whatever end-of-sequence tokens come")
    gen.add_argument("--truncate", type=int, default=None, help="keep only the last N prompt tokens")
    gen.add_argument("--best-of", type=int, default=None,
                     help="sample N sequences, answer with the most likely (needs sampling; not with --stream)")
    gen.add_argument("--details", action="store_true", help="per-token ids and logprobs (--json)")
    gen.add_argument("--decoder-input-details", action="store_true",
                     help="the prompt's tokens with logprobs in details.prefill (--json)")
    gen.add_argument("--return-k-alternatives", type=int, default=None, metavar="K",
                     help="per generated token, its K most likely alternatives (--json with --details)")
    gen.add_argument("--return-full-text", action="store_true", help="prepend the prompt to the text")
    fmt = gen.add_mutually_exclusive_group()
    fmt.add_argument("--response-format-json", default=None, metavar="SCHEMA_FILE_OR_JSON",
                     help="constrain the text to JSON valid against this JSON schema (a file, or the JSON itself)")
    fmt.add_argument("--response-format-regex", default=None, metavar="PATTERN",
                     help="constrain the text to match this regex in full")
    gen.add_argument("--merged-adapters", default=None, metavar="JSON",
                     help='merge adapters for this job, LoRAX\'s map: \'{"ids": ["a", "b"], "weights": [0.5, 0.5], '
                          '"merge_strategy": "linear"}\' (instead of --adapter-id)')
    gen.add_argument("--api-token", default=os.environ.get("LORAQ_API_TOKEN"),
                     help="token for private hub adapters (env LORAQ_API_TOKEN)")
    gen.add_argument("--json", action="store_true",
                     help="print the result reply as JSON (with --stream: one line per token)")
    gen.add_argument("--timeout", type=float, default=float(_env("LORAQ_TIMEOUT", "120")),
                     help="seconds to wait for the result (env LORAQ_TIMEOUT; default 120)")
    _add_broker_args(gen)
    gen.set_defaults(func=_generate)

    sub.add_parser("worker", add_help=False, help="run a worker (flags: loraq worker --help)")
    bench = sub.add_parser("bench", help="benchmarks, from a checkout (loraq bench KIND --help)",
                           description=_bench_description())
    kinds = bench.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, text in BENCH_HELP.items():
        kinds.add_parser(kind, add_help=False, help=text)

    sub.add_parser("demo", add_help=False,
                   help="run a worker on the embedded model and the demo adapters, print results")
    sub.add_parser("gateway", add_help=False,
                   help="HTTP gateway: LoRAX and OpenAI APIs on the queue (loraq gateway --help)")
    sub.add_parser("health", add_help=False,
                   help="exit 0 if the local worker's /healthz answers (loraq health --help)")
    return parser


def _add_broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amqp-url", default=_env("LORAQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
                   help="broker URL (env LORAQ_AMQP_URL)")
    p.add_argument("--exchange", default=_env("LORAQ_EXCHANGE", "loraq"),
                   help="jobs exchange (env LORAQ_EXCHANGE)")
    p.add_argument("--routing-key", default=_env("LORAQ_ROUTING_KEY", "generate"),
                   help="jobs routing key (env LORAQ_ROUTING_KEY)")
    p.add_argument("--content-type", choices=sorted(CONTENT_TYPES),
                   default=_env("LORAQ_CONTENT_TYPE", "msgpack"),
                   help="wire encoding of the job (env LORAQ_CONTENT_TYPE)")


def _generate(args: argparse.Namespace) -> int:
    return asyncio.run(_generate_async(args))


async def _generate_async(args: argparse.Namespace) -> int:
    # Imported here: `loraq worker` / `loraq bench` never pay for the client's imports.
    from consumer.client import Client, LoraqError, Token
    from consumer.logging import redact_url
    from consumer.protocol import Limits, ProtocolError, Topology, parse_merged_adapters, parse_response_format

    prompt: dict[str, Any]
    if args.chat or args.system is not None:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = {"messages": messages}
    else:
        prompt = {"inputs": args.prompt}
    topology = Topology(exchange=args.exchange, routing_key=args.routing_key)
    try:
        params: dict[str, Any] = {
            "adapter_id": args.adapter_id, "adapter_source": args.adapter_source, "api_token": args.api_token,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "do_sample": args.do_sample or None, "top_k": args.top_k, "top_p": args.top_p,
            "typical_p": args.typical_p, "repetition_penalty": args.repetition_penalty,
            "frequency_penalty": args.frequency_penalty, "presence_penalty": args.presence_penalty,
            "stop": args.stop, "seed": args.seed, "best_of": args.best_of, "truncate": args.truncate,
            "details": args.details or None, "decoder_input_details": args.decoder_input_details or None,
            "return_k_alternatives": args.return_k_alternatives,
            "ignore_eos_token": args.ignore_eos_token or None, "return_full_text": args.return_full_text or None,
            "merged_adapters": parse_merged_adapters(_json_arg(args.merged_adapters, "--merged-adapters"),
                                                     Limits.unbounded()),
            "response_format": parse_response_format(_response_format(args)),
        }
        async with Client(args.amqp_url, topology=topology,
                          content_type=CONTENT_TYPES[args.content_type]) as client:
            if not args.stream:
                result = await client.generate(**prompt, **params, timeout=args.timeout)
                print(json.dumps(result.to_wire(), ensure_ascii=False) if args.json
                      else result.generated_text)
                return 0
            async for item in client.generate_stream(**prompt, **params, timeout=args.timeout):
                if args.json:
                    raw = dataclasses.asdict(item) if isinstance(item, Token) else item.to_wire()
                    print(json.dumps(raw, ensure_ascii=False), flush=True)
                elif isinstance(item, Token):
                    print(item.text, end="", flush=True)
                else:
                    print(flush=True)
            return 0
    except (LoraqError, ProtocolError) as e:
        print(f"loraq: {e}", file=sys.stderr)
        return 1
    except ConnectionError as e:  # aio-pika's connection errors are ConnectionErrors too
        print(f"loraq: cannot reach the broker at {redact_url(args.amqp_url)}: {e}", file=sys.stderr)
        return 1


def _json_arg(value: str | None, flag: str) -> Any:
    """A flag's JSON value, or the JSON in the file it names; None when the flag is absent."""
    from consumer.protocol import VALIDATION, ProtocolError

    if value is None:
        return None
    text = value
    if not value.lstrip().startswith(("{", "[")) and Path(value).is_file():
        text = Path(value).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except ValueError as e:
        raise ProtocolError(VALIDATION, f"{flag}: not JSON, nor a file of JSON: {e}") from None


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """--response-format-json / --response-format-regex as the wire's response_format map."""
    if args.response_format_regex is not None:
        return {"type": "regex", "pattern": args.response_format_regex}
    schema = _json_arg(args.response_format_json, "--response-format-json")
    return None if schema is None else {"type": "json_object", "schema": schema}


def _benchmarks_root() -> Path | None:
    """The checkout whose benchmarks/ to run: the one this package runs from (an editable install
    maps only the product packages onto sys.path), else the current directory; None if neither."""
    for root in (CHECKOUT, Path.cwd()):
        if (root / "benchmarks" / "__init__.py").is_file():
            return root
    return None


def _bench_description() -> str:
    text = ("Benchmarks: loraq bench KIND, or python -m benchmarks.KIND in a checkout. They live in the "
            "repository's benchmarks/ folder, which is not part of the installed package, and need the "
            "worker extra (pip install -e '.[worker,test]').")
    if _benchmarks_root() is None:
        text += (" No benchmarks/ folder here: this is an installed package, not a checkout; clone the "
                 "repository to run them.")
    return text


def _delegate(target: str, argv: list[str]) -> int:
    module_name, _, function = target.partition(":")
    if module_name.startswith("benchmarks."):
        root = _benchmarks_root()
        if root is None:
            print(f"loraq: {module_name} is not part of this install: the benchmarks run from a "
                  f"checkout of the repository (see loraq bench --help)", file=sys.stderr)
            return 2
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if not (module_name == e.name or module_name.startswith(f"{e.name}.")):
            raise  # the module exists but a dependency of it is missing: show that
        print(f"loraq: {module_name} is not part of this install", file=sys.stderr)
        return 2
    return int(getattr(module, function)(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Delegated commands skip our parser: every flag after them belongs to their own.
    if argv[:1] in (["worker"], ["health"], ["demo"], ["gateway"]):
        return _delegate(DELEGATES[argv[0]], argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and f"bench {argv[1]}" in DELEGATES:
        return _delegate(DELEGATES[f"bench {argv[1]}"], argv[2:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
