"""``--jobs N``: choosing the number of workers (ggo_cli.run.series_pool); the worker-process
runs are in tests/e2e/test_series_pool_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggo_cli.config import RunConfig
from ggo_cli.domain import SeriesInfo
from ggo_cli.run import placement, series_pool
from ggo_cli.run.series_pool import auto_jobs


def _fake_series(name: str) -> SeriesInfo:
    return SeriesInfo(
        study_instance_uid="1.2.3", series_instance_uid=f"1.2.3.{name}", files=(), location=name
    )


def test_auto_jobs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    todo = [_fake_series(str(k)) for k in range(20)]
    cfg = RunConfig(inputs=(tmp_path,), out_dir=tmp_path / "out", model_path=tmp_path / "m")
    monkeypatch.setattr(series_pool, "usable_cores", lambda: 16)
    monkeypatch.setattr(series_pool, "available_memory_bytes", lambda: 128 << 30)
    monkeypatch.setattr(series_pool, "cuda_wanted", lambda request: False)
    assert auto_jobs(cfg, todo) == 1  # the CPU: one process, the model uses every core
    assert auto_jobs(RunConfig(**{**_fields(cfg), "jobs": 3}), todo) == 3
    assert auto_jobs(RunConfig(**{**_fields(cfg), "jobs": 3}), todo[:2]) == 2
    assert auto_jobs(cfg, []) == 1
    monkeypatch.setattr(series_pool, "cuda_wanted", lambda request: True)
    monkeypatch.setattr(placement, "gpu_memory_bytes", lambda index: 80 << 30)
    assert auto_jobs(cfg, todo) == 8  # 16 cores / 2, at most 8
    monkeypatch.setattr(placement, "gpu_memory_bytes", lambda index: 24 << 30)
    assert auto_jobs(cfg, todo) == 4  # 80 % of 24 GiB, 4 GiB a worker
    monkeypatch.setattr(placement, "gpu_memory_bytes", lambda index: 6 << 30)
    assert auto_jobs(cfg, todo) == 1
    monkeypatch.setattr(placement, "gpu_memory_bytes", lambda index: None)
    assert auto_jobs(cfg, todo) == 2  # GPU memory unknown: two
    monkeypatch.setattr(placement, "gpu_memory_bytes", lambda index: 80 << 30)
    monkeypatch.setattr(series_pool, "usable_cores", lambda: 6)
    assert auto_jobs(cfg, todo) == 3
    # 1000-slice series: 6 bytes a voxel (one series per worker) + 2 GiB a worker (3.46 GiB);
    # three quarters of 16 GiB hold 3.
    big = [
        SeriesInfo("1.2", f"1.2.{k}", tuple(Path(f"{i}.dcm") for i in range(1000)), "x")
        for k in range(4)
    ]
    monkeypatch.setattr(series_pool, "usable_cores", lambda: 16)
    monkeypatch.setattr(series_pool, "available_memory_bytes", lambda: 16 << 30)
    assert auto_jobs(cfg, big) == 3
    monkeypatch.setattr(series_pool, "available_memory_bytes", lambda: 2 << 30)
    assert auto_jobs(cfg, big) == 1


def _fields(cfg: RunConfig) -> dict[str, object]:
    return {name: getattr(cfg, name) for name in RunConfig.__dataclass_fields__}
