"""The picture of a `loraq bench e2e` run: (left) tokens/s against the distinct adapters among a burst's
jobs, (right) p50 and p99 latency against the adapters in rotation; loraq and the naive PEFT worker on
the same axes.

    python -m benchmarks.e2e --json results.json --plot results.png    # during a run
    python -m benchmarks.plot results.json results.png                 # again, from its JSON

matplotlib is imported here only, and only when a picture is drawn: pip install 'loraq[plot]'.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

LABELS = {"loraq": "loraq", "peft-batch": "naive PEFT worker, adapter_names batches",
          "peft-serial": "naive PEFT worker, one job at a time"}
COLORS = {"loraq": "tab:blue", "peft-batch": "tab:orange", "peft-serial": "tab:orange"}


def require_matplotlib() -> None:
    """Exit with the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise SystemExit("drawing the picture needs matplotlib: pip install 'loraq[plot]'") from None


def draw(numbers: dict[str, Any], out: Path) -> None:
    """Write the two-panel PNG of a run's numbers (its --json, with the sweep and rotation) to `out`."""
    missing = [name for name in ("sweep", "rotation") if name not in numbers]
    if missing:
        raise ValueError(f"no {' and no '.join(missing)} in these numbers: run them (--scenarios)")
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), layout="constrained")
    sweep = numbers["sweep"]
    ks = sorted({int(k) for by_k in sweep["tok_s"].values() for k in by_k} - {0})
    for name, by_k in sweep["tok_s"].items():
        left.plot(ks, [by_k[str(k)] for k in ks], marker="o", color=COLORS.get(name), label=LABELS.get(name, name))
        if "0" in by_k:
            left.axhline(by_k["0"], linestyle="--", color=COLORS.get(name), alpha=0.6,
                         label=f"{LABELS.get(name, name)}, base model only")
    _log_x(left, ks, base=2)
    left.set(xlabel="distinct adapters among the jobs of a burst", ylabel="tokens/s (higher is better)",
             title=f"{sweep['jobs']} jobs × {sweep['new_tokens']} new tokens, published one by one\n"
                   f"{sweep['adapters']}")

    rotation = numbers["rotation"]
    sets = sorted({int(n) for system in rotation["systems"].values() for n in system["sets"]})
    for name, system in rotation["systems"].items():
        for stat, style in (("p50", "-"), ("p99", "--")):
            right.plot(sets, [system["sets"][str(n)][f"{stat}_ms"] for n in sets], marker="o", linestyle=style,
                       color=COLORS.get(name), label=f"{LABELS.get(name, name)}, {stat}")
    _log_x(right, sets, base=10)
    right.set(xlabel="adapters in rotation (cold: never loaded before)", ylabel="latency per job, ms (lower is better)",
              title=f"one job at a time, {rotation['new_tokens']} new tokens, {rotation['jobs']} jobs per set\n"
                    f"{rotation['adapters']}")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"loraq bench e2e: {numbers['model']}, {numbers['cores']} CPU cores, {numbers['date']}")
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _log_x(ax: Any, values: list[int], base: int) -> None:
    """A log-scale x axis ticked at exactly `values`, and a y axis from 0."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=base)
    ax.set_xticks(values, [str(v) for v in values])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(bottom=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="the JSON of `loraq bench e2e --json`")
    ap.add_argument("out", type=Path, help="the PNG to write")
    args = ap.parse_args(argv)
    draw(json.loads(args.results.read_text()), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
