"""The C dropout kernel: built once per machine, the same values as torch's arithmetic, and a
clean fallback where it cannot be built."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cvmkd_nmt import kernels


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty kernel cache, and the library looked up again (before and after the test)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels._library.cache_clear()
    yield tmp_path / "cvmkd" / "kernels"
    kernels._library.cache_clear()


def test_the_kernel_is_built_once_and_reused(fresh: Path) -> None:
    assert kernels.dropout_kernel(torch.ones(3)) is not None
    built = list(fresh.glob("dropout-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels._library.cache_clear()
    assert kernels.dropout_kernel(torch.ones(3)) is not None
    assert [p.stat().st_mtime_ns for p in fresh.glob("dropout-*.so")] == [stamp]  # not rebuilt
    assert not [p for p in fresh.iterdir() if p.is_dir()]  # no scratch folder left behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_values_are_torch_s_product_rounded_once(fresh: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5000, generator=g) * 100).to(dtype)
    x[7] = float("nan")
    scale = 65536 / (65536 - 6554)
    kernel = kernels.dropout_kernel(x)
    out = kernel(x, 6554, scale)
    expected = (x.float() * scale).to(dtype)  # one rounding of the fp32 product, as the kernel does
    number = ~torch.isnan(x)
    kept = (out != 0) & number
    assert torch.equal(out[kept], expected[kept])
    assert bool(torch.isnan(out[7]))  # NaN stays NaN, kept or dropped (NaN x 0), as in torch
    assert 0.08 < 1 - float(kept.float().mean()) < 0.12


def test_other_tensors_take_torch_s_path(fresh: Path) -> None:
    assert kernels.dropout_kernel(torch.ones(3, dtype=torch.float16)) is None
    assert kernels.dropout_kernel(torch.ones(3, dtype=torch.float64)) is None


def test_without_a_compiler_dropout_runs_through_torch(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cvmkd_nmt.model.transformer import dropout

    monkeypatch.setattr("shutil.which", lambda name: None)
    caplog.set_level(logging.INFO, logger="cvmkd")
    assert kernels.dropout_kernel(torch.ones(3)) is None
    assert "no C compiler found" in caplog.text
    y = dropout(torch.ones(1000), 0.5, True)
    assert 0.4 < float((y == 0).float().mean()) < 0.6


def test_a_failing_build_warns_and_falls_back(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broken = fresh.parent / "broken-cc"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no input' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    caplog.set_level(logging.INFO, logger="cvmkd")
    assert kernels.dropout_kernel(torch.ones(3)) is None
    assert "could not build the dropout kernel (CalledProcessError: cc: fatal error: no input)" in caplog.text
    assert not list(fresh.glob("dropout-*.so"))


def test_the_kernel_can_be_turned_off(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVMKD_NATIVE_KERNELS", "0")
    assert kernels.dropout_kernel(torch.ones(3)) is None
    assert not fresh.exists()
