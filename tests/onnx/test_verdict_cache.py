"""The on-disk cache of variant self-check verdicts, and the in-process one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ggo_cli.onnx import verdict_cache
from ggo_cli.onnx.variant_verdict import VariantCheck
from ggo_cli.onnx.verdict_cache import VerdictCache, cache_dir, read_cached_verdict

KEY = {"model_sha256": "ab" * 32, "variant": "int8", "recipe": "test"}


def _entry(path: Path, key: dict[str, str], written: float, verdict: VariantCheck) -> Path:
    path.write_text(
        json.dumps({"key": key, "written": written, "verdict": verdict.to_dict()}),
        encoding="utf-8",
    )
    return path


def test_a_cached_verdict_is_read_back_marked_cached(tmp_path: Path) -> None:
    """An entry for the same key gives its verdict back, flagged as read from the cache."""
    verdict = VariantCheck("int8", "test", ran=True, passed=True, reason="Dice 0.999")
    path = _entry(tmp_path / "entry.json", KEY, 100.0, verdict)
    cached = read_cached_verdict(path, KEY, newer_than=None)
    assert cached is not None and cached.cached and not verdict.cached
    assert (cached.variant, cached.recipe, cached.passed, cached.reason) == (
        "int8", "test", True, "Dice 0.999"
    )


def test_another_key_a_stale_entry_or_a_broken_file_is_no_verdict(tmp_path: Path) -> None:
    """Only an entry for exactly this key, newer than ``newer_than``, counts; junk is a miss."""
    verdict = VariantCheck("int8", "test", ran=True, passed=True, reason="ok")
    path = _entry(tmp_path / "entry.json", KEY, 100.0, verdict)
    assert read_cached_verdict(path, {**KEY, "recipe": "other"}, newer_than=None) is None
    assert read_cached_verdict(path, KEY, newer_than=200.0) is None
    assert read_cached_verdict(path, KEY, newer_than=50.0) is not None
    assert read_cached_verdict(tmp_path / "missing.json", KEY, newer_than=None) is None
    (tmp_path / "junk.json").write_text("{not json", encoding="utf-8")
    assert read_cached_verdict(tmp_path / "junk.json", KEY, newer_than=None) is None
    (tmp_path / "partial.json").write_text(json.dumps({"key": KEY}), encoding="utf-8")
    assert read_cached_verdict(tmp_path / "partial.json", KEY, newer_than=None) is None


def test_the_in_process_cache_keeps_one_verdict_per_key() -> None:
    """A settled key returns the very verdict stored; an unknown key returns None."""
    cache = VerdictCache()
    verdict = VariantCheck("fp16", "", ran=True, passed=False, reason="GGO pixels -30%")
    assert cache.get("abc") is None
    cache.put("abc", verdict)
    assert cache.get("abc") is verdict
    assert cache.get("abd") is None
    assert VerdictCache().get("abc") is None  # each owner has its own


def test_the_cache_folder_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GGO_CACHE_DIR names the folder; without it, the platform's user cache folder is used."""
    monkeypatch.setenv(verdict_cache.CACHE_ENV, str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv(verdict_cache.CACHE_ENV)
    assert cache_dir().name == "ggo-cli" and cache_dir() != tmp_path / "c"
    assert os.path.isabs(cache_dir())
