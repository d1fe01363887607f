"""Where adapter bytes come from: a local directory tree, or the Hugging Face hub.

Adapter ids are hostile input (they arrive in job messages): every source checks them before
touching the file system or the network.
"""

from __future__ import annotations

import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Hashable
from pathlib import Path

from engine.adapter import CONFIG_FILE, PICKLE_FILE, SAFETENSORS_FILE
from engine.request import EngineError, ErrorType
from engine.token_fingerprint import TokenFingerprint

ADAPTER_FILES = (CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE)
SALT_FILE = ".token-salt"  # beside the hub cache: see TokenFingerprint
TENANTS_DIR = "tenants"  # <cache>/tenants/<fingerprint>/: the hub cache of the jobs with that token
_HUB_ID = re.compile(r"(?P<org>[A-Za-z0-9][\w.-]{0,95})/(?P<name>[A-Za-z0-9][\w.-]{0,95})(@(?P<rev>[\w./-]{1,255}))?")


class AdapterSource(ABC):
    """A place adapters are fetched from into a local directory of PEFT files.

    Contract: `fetch` runs on a background loader thread, may block (disk, network), and either
    returns a local directory holding `adapter_config.json` and the weights, or raises EngineError
    (`adapter_not_found` / `validation`, `retryable=True` for transient faults). It must never
    read or return anything outside the places it owns, and never log `api_token`. A source whose
    answer depends on who asks (the hub: private repos) returns a non-empty `scope` for a token;
    the store then keys that token's entries apart, and `fetch` / `evict` with that token touch
    only that token's files.
    """

    # True when fetched files live in our disk-cache tier and `evict` may delete them.
    caches_on_disk: bool = False
    # True when `stamp` is a few local stat calls: the store then checks it inline instead of
    # queueing a re-check on a loader thread (which would hold the request back for a step).
    cheap_stamp: bool = False

    @abstractmethod
    def fetch(self, adapter_id: str, api_token: str | None) -> Path:
        """A local directory with the adapter's PEFT files."""

    def scope(self, api_token: str | None) -> str:
        """The part of the cache key that depends on the token ("": none, every job shares the entry)."""
        return ""

    def stamp(self, adapter_id: str) -> Hashable | None:
        """A cheap fingerprint that changes when the adapter's files change (None: immutable or
        not checkable without a fetch). The store compares it to decide whether to reload."""
        return None

    def evict(self, adapter_id: str, api_token: str | None = None) -> None:
        """Delete the adapter's files (those fetched with `api_token`) from the disk cache (only
        for `caches_on_disk` sources)."""
        return None


def _not_found(message: str, retryable: bool = False) -> EngineError:
    return EngineError(ErrorType.ADAPTER_NOT_FOUND, message, retryable=retryable)


def _bad_id(message: str) -> EngineError:
    return EngineError(ErrorType.VALIDATION, message)


class LocalSource(AdapterSource):
    """Adapters under one root directory; the id is a relative path (`acme/support-bot`).

    Refused: empty ids, absolute paths, `..` components, backslashes, NUL, and any path or adapter
    file that resolves (through symlinks) outside the root. Symlinks inside the root are fine.
    """

    cheap_stamp = True

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root).resolve() if root else None

    def _resolve(self, adapter_id: str) -> Path:
        if self.root is None:
            raise _not_found("no adapter_root is configured for local adapters")
        if not adapter_id or not isinstance(adapter_id, str):
            raise _bad_id("adapter id must be a non-empty relative path")
        if "\x00" in adapter_id or "\\" in adapter_id:
            raise _bad_id("adapter id must not contain NUL or backslashes")
        if adapter_id.startswith("/") or re.match(r"[A-Za-z]:", adapter_id) or adapter_id.startswith("~"):
            raise _bad_id("adapter id must be a relative path under the adapter root")
        if any(part == ".." for part in adapter_id.split("/")):
            raise _bad_id("adapter id must not contain '..'")
        path = (self.root / adapter_id).resolve()
        if not path.is_relative_to(self.root):
            raise _bad_id("adapter id resolves outside the adapter root")
        if not path.is_dir():
            raise _not_found(f"adapter {adapter_id!r} not found")
        for name in ADAPTER_FILES:  # a symlinked weights file must not leave the root either
            file = path / name
            if file.exists() and not file.resolve().is_relative_to(self.root):
                raise _bad_id(f"adapter file {name} resolves outside the adapter root")
        return path

    def fetch(self, adapter_id: str, api_token: str | None) -> Path:
        path = self._resolve(adapter_id)
        if not (path / CONFIG_FILE).is_file():
            raise _not_found(f"adapter {adapter_id!r} not found (no {CONFIG_FILE})")
        return path

    def stamp(self, adapter_id: str) -> Hashable | None:
        """(file, mtime_ns, size) of each adapter file: changes when a file is rewritten or replaced."""
        try:
            path = self._resolve(adapter_id)
        except EngineError:
            return None
        out = []
        for name in ADAPTER_FILES:
            try:
                st = (path / name).stat()
            except OSError:
                continue
            out.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)


class HubSource(AdapterSource):
    """Adapters on the Hugging Face hub: `org/name` or `org/name@revision`, downloaded with
    `huggingface_hub.snapshot_download` (adapter files only) into our disk-cache directory, in the
    hub's own cache layout, so a cached snapshot is reused and the hub resolves `main` per fetch
    (falling back to the cached snapshot when the hub is unreachable).

    Tenants: `snapshot_download` also falls back to a cached snapshot when the hub *refuses* the
    token (401/404 on a private repo), so one shared cache would hand tenant A's private adapter to
    anyone. Each token therefore gets its own cache under `tenants/<fingerprint>/` (see
    engine/token_fingerprint.py) and its own store entries (`scope`); jobs without a token use the
    top directory, fetched with no credentials at all unless `worker_credentials` lets them use the
    worker's own hub login (HF_TOKEN, `hf auth login`). The top directory therefore only holds
    what every job of this worker may read: public repos, those the worker's login may read when
    that is on, and whatever the operator put there."""

    caches_on_disk = True

    def __init__(self, cache_dir: str | os.PathLike, allow_orgs: tuple[str, ...] = (),
                 allow_pickle: bool = False, offline: bool | None = None,
                 worker_credentials: bool = False) -> None:
        from huggingface_hub import constants

        self.cache_dir = Path(cache_dir)
        # offline: resolve from the cache only (HF_HUB_OFFLINE=1 by default)
        self.offline = constants.HF_HUB_OFFLINE if offline is None else offline
        self.allow_orgs = frozenset(allow_orgs)
        self.patterns = [CONFIG_FILE, SAFETENSORS_FILE] + ([PICKLE_FILE] if allow_pickle else [])
        self.worker_credentials = worker_credentials
        self._fingerprint = TokenFingerprint(self.cache_dir / SALT_FILE)

    def scope(self, api_token: str | None) -> str:
        return self._fingerprint(api_token) if api_token else ""

    def cache_for(self, api_token: str | None) -> Path:
        """The cache directory of the jobs that send `api_token`."""
        return self.cache_dir / TENANTS_DIR / self.scope(api_token) if api_token else self.cache_dir

    def parse(self, adapter_id: str) -> tuple[str, str | None]:
        """`org/name[@revision]` -> (repo_id, revision); raises EngineError(validation)."""
        m = _HUB_ID.fullmatch(adapter_id or "")
        if m is None or ".." in adapter_id:
            raise _bad_id("hub adapter id must look like org/name or org/name@revision")
        if self.allow_orgs and m.group("org") not in self.allow_orgs:
            raise _bad_id(f"hub org {m.group('org')!r} is not in the allow-list")
        return f"{m.group('org')}/{m.group('name')}", m.group("rev")

    def fetch(self, adapter_id: str, api_token: str | None) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo_id, revision = self.parse(adapter_id)
        # token None: huggingface_hub's own login; False: no credentials at all
        token: str | bool | None = api_token or (None if self.worker_credentials else False)
        try:
            path = snapshot_download(repo_id, revision=revision, cache_dir=self.cache_for(api_token), token=token,
                                     allow_patterns=self.patterns, local_files_only=self.offline)
        # LocalEntryNotFoundError subclasses EntryNotFoundError: it must come first
        except LocalEntryNotFoundError:  # hub unreachable (or offline mode) and nothing cached
            raise _not_found(f"hub adapter {adapter_id!r} not cached and the hub is "
                             f"{'off (offline mode)' if self.offline else 'unreachable'}",
                             retryable=not self.offline) from None
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, EntryNotFoundError) as e:
            raise _not_found(f"hub adapter {adapter_id!r} not found or not accessible "
                             f"({type(e).__name__}{_no_token(token)})") from None
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403, 404):
                raise _not_found(f"hub adapter {adapter_id!r} not found or not accessible "
                                 f"(HTTP {status}{_no_token(token)})") from None
            raise _not_found(f"hub error for {adapter_id!r} (HTTP {status})", retryable=True) from None
        except Exception as e:  # network (httpx) and disk faults: worth a retry later
            raise _not_found(f"hub fetch of {adapter_id!r} failed: {type(e).__name__}", retryable=True) from None
        return Path(path)

    def evict(self, adapter_id: str, api_token: str | None = None) -> None:
        repo_id, _ = self.parse(adapter_id)
        shutil.rmtree(self.cache_for(api_token) / f"models--{repo_id.replace('/', '--')}", ignore_errors=True)


def _no_token(token: str | bool | None) -> str:
    """Why a private repo may be refused: the job sent no token (and the worker lends it none)."""
    return "; the job sent no api_token" if token is False else ""
