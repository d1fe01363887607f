"""A setting as a `--flag` with an env twin: command line > environment > default. The worker's and
the gateway's settings each list theirs (which fields, which env names); parsing and conversion
are this module's, so both read their flags the same way."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, dataclass
from typing import Any


@dataclass(frozen=True)
class Flag:
    name: str  # the field's name: --name-with-dashes
    env: str  # its env twin, e.g. LORAQ_MAX_BATCH
    kind: str  # its annotation, e.g. "int | None"
    default: Any
    help: str
    group: str | None = None  # the settings field of its group; None: a field of the settings

    @classmethod
    def of(cls, f: Field[Any], env: str, help: str, group: str | None = None) -> Flag:
        """The flag of dataclass field `f` (a default_factory's default reads as None)."""
        default = f.default if f.default is not MISSING else None
        return cls(f.name, env, str(f.type), default, help, group)

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, settings: object) -> Any:
        return getattr(settings if self.group is None else getattr(settings, self.group), self.name)

    def convert(self, raw: str) -> Any:
        """A command-line or env string as this flag's type."""
        kind = self.kind.replace(" ", "")
        try:
            if kind.startswith("bool"):
                if raw.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(raw)
                return raw.strip().lower() in ("1", "true", "yes", "on")
            if kind.startswith("tuple"):
                return tuple(x.strip() for x in raw.split(",") if x.strip())
            if raw == "" and "None" in kind:
                return None
            if kind.startswith("int"):
                return int(raw)
            if kind.startswith("float"):
                return float(raw)
            return raw
        except ValueError:
            raise SystemExit(f"{self.env}: cannot read {raw!r} as {self.kind}") from None


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag]) -> argparse.ArgumentParser:
    """`parser` with one option per flag, each defaulting to None (unset: `read_flags` asks the
    environment) and its help naming its env twin and default."""
    for flag in flags:
        help = f"{flag.help} [env {flag.env}, default {flag.default!r}]"
        if flag.kind.startswith("bool"):
            parser.add_argument(flag.option, action=argparse.BooleanOptionalAction, default=None,
                                help=help)
        else:
            parser.add_argument(flag.option, default=None, help=help, type=flag.convert)
    return parser


def read_flags(args: argparse.Namespace, flags: Iterable[Flag],
               env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """{name: value} of the flags set in `args` (parsed by a parser of `add_flags`) or else by
    their env twin in `env` (default os.environ); flags set in neither are left out."""
    env = os.environ if env is None else env
    parsed = vars(args)
    values: dict[str, Any] = {}
    for flag in flags:
        if parsed[flag.name] is not None:
            values[flag.name] = parsed[flag.name]
        elif (raw := env.get(flag.env)) is not None:
            values[flag.name] = flag.convert(raw)
    return values
