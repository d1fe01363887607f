"""Tenants on the hub: a private adapter fetched with one job's token is never served, from any
tier, to a job without that token; tokens key the cache only as salted fingerprints; jobs without
a token use the worker's own hub login only when that is configured. The hub is a local stand-in
(tests/builders.FakeHub): no network."""

from __future__ import annotations

import os
import stat

import pytest
from structlog.testing import capture_logs

from engine.adapter_source import HubSource
from engine.request import (
    AdapterRef,
    Completion,
    EngineError,
    ErrorType,
    GenerationFailure,
    GenerationRequest,
    SamplingParams,
)
from engine.token_fingerprint import TokenFingerprint
from tests.builders import FakeHub, make_adapter, run_requests

TOKEN_A = "hf_tenantA_0123456789abcdef"
TOKEN_B = "hf_tenantB_fedcba9876543210"


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    """The stand-in hub behind huggingface_hub.snapshot_download, online."""
    import huggingface_hub
    from huggingface_hub import constants

    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return fake


@pytest.fixture
def spec(loaded_models):
    return loaded_models("llama").spec


def names_under(root) -> str:
    return " ".join(name for _, dirs, files in os.walk(root) for name in (*dirs, *files))


def not_found(outcome) -> str:
    assert isinstance(outcome, GenerationFailure), outcome
    assert outcome.error.type == ErrorType.ADAPTER_NOT_FOUND, outcome.error.message
    return outcome.error.message


def test_token_fingerprint_is_salted_stable_and_private(tmp_path):
    one = TokenFingerprint(tmp_path / "a" / "salt")
    assert one(TOKEN_A) == TokenFingerprint(tmp_path / "a" / "salt")(TOKEN_A)  # same salt file: same key
    assert one(TOKEN_A) != one(TOKEN_B)
    assert TokenFingerprint(tmp_path / "b" / "salt")(TOKEN_A) != one(TOKEN_A)  # another salt: unlinkable
    assert len(one(TOKEN_A)) == 24 and TOKEN_A not in one(TOKEN_A)
    assert stat.S_IMODE((tmp_path / "a" / "salt").stat().st_mode) == 0o600
    (tmp_path / "bad").write_bytes(b"short")
    with pytest.raises(ValueError):
        TokenFingerprint(tmp_path / "bad")


def test_hub_source_keeps_each_tokens_cache_apart(tmp_path, hub, spec):
    hub.add("acme/private", make_adapter(spec, tmp_path / "src" / "private", seed=1), private_to=TOKEN_A)
    hub.add("acme/public", make_adapter(spec, tmp_path / "src" / "public", seed=2))
    cache = tmp_path / "disk"
    src = HubSource(cache, offline=False)

    a = src.fetch("acme/private", TOKEN_A)
    assert a.is_relative_to(src.cache_for(TOKEN_A)) and (a / "adapter_model.safetensors").is_file()
    # what a shared cache would do: the hub refuses B, and snapshot_download serves A's copy anyway
    assert hub.snapshot_download("acme/private", cache_dir=src.cache_for(TOKEN_A), token=TOKEN_B) == str(a)
    for token in (TOKEN_B, None):
        with pytest.raises(EngineError) as e:
            src.fetch("acme/private", token)
        assert e.value.type == ErrorType.ADAPTER_NOT_FOUND and not e.value.retryable
    assert "no api_token" in str(e.value)
    assert hub.calls[-1] == ("acme/private", False), "no token: no credentials at all, not the worker's"

    # a public adapter: every job gets it (a token's jobs through their own cache)
    assert src.fetch("acme/public", None).is_relative_to(cache / "models--acme--public")
    assert src.fetch("acme/public", TOKEN_B).is_relative_to(src.cache_for(TOKEN_B))

    # offline, after a restart: each token still reads its own cache only
    offline = HubSource(cache, offline=True)
    assert offline.scope(TOKEN_A) == src.scope(TOKEN_A) != "" and offline.scope(None) == ""
    assert offline.fetch("acme/private", TOKEN_A) == a
    with pytest.raises(EngineError) as e:
        offline.fetch("acme/private", TOKEN_B)
    assert e.value.type == ErrorType.ADAPTER_NOT_FOUND

    assert TOKEN_A not in names_under(cache) and TOKEN_B not in names_under(cache)
    src.evict("acme/private", TOKEN_A)
    assert not a.exists() and (cache / "models--acme--public").is_dir()


@pytest.mark.parametrize("lend", [False, True])
def test_worker_credentials_only_when_configured(tmp_path, hub, spec, lend):
    hub.worker_token = "hf_worker_login"
    hub.add("acme/house", make_adapter(spec, tmp_path / "src"), private_to="hf_worker_login")
    src = HubSource(tmp_path / "disk", offline=False, worker_credentials=lend)
    if lend:
        assert src.fetch("acme/house", None).is_dir()
    else:
        with pytest.raises(EngineError) as e:
            src.fetch("acme/house", None)
        assert e.value.type == ErrorType.ADAPTER_NOT_FOUND
    assert hub.calls == [("acme/house", None if lend else False)]  # None: huggingface_hub's own login


def job(rid: str, adapter: AdapterRef) -> GenerationRequest:
    return GenerationRequest(id=rid, prompt_token_ids=[5, 17, 42, 99, 3], adapter=adapter,
                             params=SamplingParams(max_new_tokens=6))


def test_private_hub_adapter_is_served_only_to_its_tenant(tmp_path, make_engine, spec, hub):
    """Tenant A's job loads the private adapter with A's token and runs on exactly its weights;
    B's jobs (no token, another token) are refused while A's copy sits in the host and disk
    tiers; A's second job is a cache hit; no token is ever logged, counted or written to disk."""
    files = make_adapter(spec, tmp_path / "src" / "private", seed=31, r=8)
    hub.add("acme/private", files, private_to=TOKEN_A)
    engine = make_engine(adapter_root=str(tmp_path / "src"), hub_enabled=True, max_lora_rank=16,
                         adapter_disk_dir=str(tmp_path / "disk"))
    reference = run_requests(engine, [job("local", AdapterRef("private"))])["local"]  # the same files, local
    assert isinstance(reference, Completion)
    with capture_logs() as logs:
        first = run_requests(engine, [job("a1", AdapterRef("acme/private", "hub", TOKEN_A))])["a1"]
        refused = run_requests(engine, [job("b-none", AdapterRef("acme/private", "hub")),
                                        job("b-other", AdapterRef("acme/private", "hub", TOKEN_B))])
        second = run_requests(engine, [job("a2", AdapterRef("acme/private", "hub", TOKEN_A))])["a2"]
    assert isinstance(first, Completion) and isinstance(second, Completion)
    assert first.token_ids == second.token_ids == reference.token_ids
    assert "no api_token" in not_found(refused["b-none"])
    not_found(refused["b-other"])
    assert [c for c in hub.calls if c[1] == TOKEN_A] == [("acme/private", TOKEN_A)], "A's second job: a cache hit"
    stats = engine.stats()["adapters"]
    assert stats["loads"] == 2 and stats["disk"]["adapters"] == 1  # the local reference, A's copy
    assert stats["device"]["pinned"] == 0
    for token in (TOKEN_A, TOKEN_B):
        assert token not in repr(logs) and token not in repr(engine.stats())
        assert token not in names_under(tmp_path / "disk")
