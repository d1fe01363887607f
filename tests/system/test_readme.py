"""The README stays true: its configuration table lists every worker setting, and the commands and
files it names exist."""

from __future__ import annotations

import re
from pathlib import Path

from consumer.settings import FLAGS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_with_flag_and_env() -> None:
    for flag in FLAGS:
        row = f"| `{flag.option}` | `{flag.env}` | `{flag.default!r}` |"
        assert row in README, f"README configuration table lacks {row}"


def test_documented_settings_exist() -> None:
    names = {flag.env for flag in FLAGS}
    documented = set(re.findall(r"\| `(LORAQ_[A-Z_]+)` \|", README))
    assert documented <= names, f"README documents unknown settings: {documented - names}"


def test_named_commands_and_files_exist() -> None:
    for path in ("scripts/demo.sh", "scripts/test.sh", "examples/publish_pika.py", "docker-compose.yml",
                 "Dockerfile", "deploy/rabbitmq_enabled_plugins"):
        assert path in README and (ROOT / path).exists(), path
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci  # CI runs the README's test command


def test_demo_adapters_named_in_readme_exist() -> None:
    for name in ("pirate", "shakespeare", "emoji"):
        assert (ROOT / "adapters" / "demo" / name / "adapter_config.json").exists(), name
