"""loraq benchmarks, run from a checkout of the repository (not part of the installed package):

    python -m benchmarks.engine      # or: loraq bench engine    throughput, loraq vs transformers vs PEFT
    python -m benchmarks.adapters    # or: loraq bench adapters  latency at 1 / 100 / 1000 adapters
    python -m benchmarks.e2e         # or: loraq bench e2e       as users meet it, through RabbitMQ: vs the
                                     #   engine alone and a naive PEFT worker (--plot draws it)
    python -m benchmarks.roofline    # a decode step against the CPU's compute and memory roofline
    python -m benchmarks.vllm_side   # against vLLM's CPU build (needs its own venv; not in CI)

They may use engine internals; the product never imports them. `benchmarks.common` holds what they
share. Measured numbers are in the README ("Benchmarks").
"""
