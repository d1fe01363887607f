"""The models a gateway can name: the base model, and the local adapters under the adapter root.

An adapter is a directory holding `adapter_config.json`; its id is its path under the root, as
the worker resolves local adapter ids. The root is scanned on each call (adapters added to it are
usable at once, as on the worker), symlinks are not followed, and the walk stops at MAX_DEPTH and
MAX_ADAPTERS. Hub adapters are not listed (any allowed hub id can be named in a request).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MAX_DEPTH = 4
MAX_ADAPTERS = 10_000


@dataclass(frozen=True)
class Catalog:
    base_model: str
    adapter_root: str | None = None

    def adapter_id(self, model: str | None) -> str | None:
        """An OpenAI `model` -> the job's adapter id: None for the base model (its name or "")."""
        return None if not model or model == self.base_model else model

    def adapters(self) -> list[str]:
        if not self.adapter_root or not os.path.isdir(self.adapter_root):
            return []
        root = Path(self.adapter_root)
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not follow symlinks
            rel = Path(dirpath).relative_to(root)
            if "adapter_config.json" in filenames and rel.parts:
                found.append(rel.as_posix())
                dirnames.clear()  # an adapter's own subfolders are not adapters
            elif len(rel.parts) >= MAX_DEPTH:
                dirnames.clear()
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if len(found) >= MAX_ADAPTERS:
                break
        return sorted(found)
