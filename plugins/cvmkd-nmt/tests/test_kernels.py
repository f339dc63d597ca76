"""cvmkd's C kernels (dropout, few-row float32 products): built once per machine, the same values
as torch's arithmetic, and a clean fallback where they cannot be built."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cvmkd_nmt import kernels
from cvmkd_nmt.hardware import find_compiler

#: the tests of the compiled kernels themselves; without a C compiler cvmkd runs through torch's
#: operations (the tests below without this mark check that), and these have nothing to test
needs_compiler = pytest.mark.skipif(
    find_compiler("CC", ("cc", "gcc", "clang")) is None, reason="no C compiler: the kernels are not built here"
)


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty kernel cache, and the library looked up again (before and after the test)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels._library.cache_clear()
    yield tmp_path / "cvmkd" / "kernels"
    kernels._library.cache_clear()


@needs_compiler
def test_the_kernel_is_built_once_and_reused(fresh: Path) -> None:
    assert kernels.dropout_kernel(torch.ones(3)) is not None
    built = list(fresh.glob("kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels._library.cache_clear()
    assert kernels.dropout_kernel(torch.ones(3)) is not None
    assert [p.stat().st_mtime_ns for p in fresh.glob("kernels-*.so")] == [stamp]  # not rebuilt
    assert not [p for p in fresh.iterdir() if p.is_dir()]  # no scratch folder left behind


PLANTED = """
#include <stdio.h>
__attribute__((constructor)) static void plant(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("planted code ran", f); fclose(f); }
}
"""


@needs_compiler
def test_a_planted_or_damaged_library_is_never_loaded_but_built_again(fresh: Path, tmp_path: Path) -> None:
    import subprocess

    from cvmkd_nmt.hardware import find_compiler

    assert kernels.dropout_kernel(torch.ones(3)) is not None
    (library,) = fresh.glob("kernels-*.so")
    assert oct(fresh.stat().st_mode & 0o777) == "0o700"
    assert library.with_name(library.name + ".sha256").is_file()
    marker = tmp_path / "marker.txt"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED % marker)
    compiler = find_compiler("CC", ("cc", "gcc", "clang"))
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    kernels._library.cache_clear()
    assert kernels.dropout_kernel(torch.ones(3)) is not None  # built again, and it works
    assert not marker.exists()  # the planted code never ran
    assert kernels._trusted(library)
    # a damaged library (one byte changed) is built again too
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    kernels._library.cache_clear()
    assert kernels.dropout_kernel(torch.ones(3)) is not None and kernels._trusted(library)


@needs_compiler
def test_a_kernel_folder_others_may_write_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "shared" / "cvmkd" / "kernels"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "shared"))
    kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="cvmkd"):
            assert kernels.dropout_kernel(torch.ones(3)) is not None
        assert "is not private to this user" in caplog.text
        assert not list(shared.iterdir())  # nothing built where others may write
    finally:
        kernels._library.cache_clear()


def test_without_a_home_the_kernels_go_to_a_per_user_temporary_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import tempfile

    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert kernels._cache_dir() == Path(tempfile.gettempdir()) / f"cvmkd-{os.getuid()}" / "cvmkd" / "kernels"


@needs_compiler
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
    assert "could not build cvmkd's C kernels (CalledProcessError: cc: fatal error: no input)" in caplog.text
    assert not list(fresh.glob("kernels-*.so"))


def test_the_kernels_can_be_turned_off(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVMKD_NATIVE_KERNELS", "0")
    assert kernels.dropout_kernel(torch.ones(3)) is None
    assert kernels.row_product(torch.ones(2, 3), None) is None
    assert not fresh.exists()


# -- the few-row float32 product ------------------------------------------------------------------


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 3, kernels.MAX_ROWS])
@pytest.mark.parametrize("with_bias", [True, False])
def test_row_product_is_torch_s_linear_within_float32_rounding(fresh: Path, rows: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(37, 70, generator=g), torch.randn(37, generator=g)
    bias = b if with_bias else None
    linear = kernels.row_product(w, bias)
    assert linear is not None
    # an input whose rows are not adjacent (a column slice): the kernel reads it in place
    x = torch.randn(rows, 90, generator=g)[:, 10:80]
    out = linear(x)
    assert out.shape == (rows, 37) and out.dtype == torch.float32
    expected = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_row_product_hands_larger_or_other_inputs_to_torch(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = torch.nn.functional.linear

    def counted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, w, b)

    w = torch.randn(5, 4)
    linear = kernels.row_product(w, torch.zeros(5))
    assert linear is not None
    monkeypatch.setattr(kernels.F, "linear", counted)
    linear(torch.ones(kernels.MAX_ROWS, 4))
    assert calls == []  # the kernel's
    many, batched = torch.ones(kernels.MAX_ROWS + 1, 4), torch.ones(2, 1, 4)
    assert torch.allclose(linear(many), real(many, w, torch.zeros(5)))
    assert torch.allclose(linear(batched), real(batched, w, torch.zeros(5)))
    assert calls == [(kernels.MAX_ROWS + 1, 4), (2, 1, 4)]


@needs_compiler
def test_row_product_leaves_training_autocast_and_other_dtypes_to_torch(fresh: Path) -> None:
    trained = torch.nn.Linear(4, 3)
    assert kernels.row_product(trained.weight, trained.bias) is None  # gradients recorded: autograd's path
    with torch.inference_mode():
        assert kernels.row_product(trained.weight, trained.bias) is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.row_product(trained.weight, trained.bias) is None  # bf16 products: torch's
    assert kernels.row_product(torch.ones(3, 4, dtype=torch.bfloat16), None) is None
    assert kernels.row_product(torch.ones(3, 4, dtype=torch.float64), None) is None


# -- the dynamic int8 product for one or two rows -------------------------------------------------


def _int8_kernel_or_skip() -> None:
    library = kernels._library()
    if library is None:
        pytest.skip("no C compiler on this machine: int8 layers run through torch's kernel")
    if library.row_product_int8 is None:
        pytest.skip("this CPU has no AVX512-VNNI: int8 layers run through torch's kernel")


@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_row_product_equals_torch_s_dynamic_kernel_bit_for_bit(with_bias: bool) -> None:
    """The C kernel reproduces torch's dynamic int8 product (input range, scale and zero point,
    rounding, int32 sums, the epilogue) exactly, for inputs of every sign and scale."""
    from cvmkd_nmt.quantized import DynamicInt8Linear

    _int8_kernel_or_skip()
    g = torch.Generator().manual_seed(1)
    compared = 0
    for shape in [(48, 64), (70, 130), (256, 256)]:
        linear = torch.nn.Linear(shape[1], shape[0], bias=with_bias)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(shape, generator=g))
        layer = DynamicInt8Linear.from_linear(linear)
        fast = layer.as_function()
        for trial in range(30):
            rows = 1 + trial % kernels.MAX_ROWS_INT8
            x = torch.randn(rows, shape[1], generator=g) * [1e-6, 0.01, 1.0, 300.0][trial % 4]
            if trial % 5 == 0:
                x = x.abs()  # no negative input: the range starts at 0
            if trial % 7 == 0:
                x = -x.abs()
            with torch.inference_mode():
                assert torch.equal(fast(x), layer(x)), (shape, trial)
            compared += 1
    assert compared == 90


def test_int8_row_product_hands_other_inputs_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from cvmkd_nmt.quantized import DynamicInt8Linear

    _int8_kernel_or_skip()
    layer = DynamicInt8Linear.from_linear(torch.nn.Linear(8, 5))
    seen: list[tuple[int, ...]] = []
    library = kernels._library()
    assert library is not None
    real = library.row_product_int8

    def counted(*args):  # type: ignore[no-untyped-def]
        seen.append(tuple(args[7:10]))  # rows, outputs, inputs
        return real(*args)

    monkeypatch.setattr(kernels, "_library", lambda: kernels._Library(library.dropout, library.row_product, counted))
    fast = layer.as_function()
    with torch.inference_mode():
        for x in (
            torch.ones(1, 8),
            torch.ones(kernels.MAX_ROWS_INT8 + 1, 8),
            torch.ones(2, 1, 8),
            torch.ones(8, 2).t(),
        ):
            assert torch.equal(fast(x), layer(x))
    # only the one-row input: more rows, 3-D, and a transposed input are torch's
    assert seen == [(1, 5, 8)]


def test_int8_layer_functions_follow_the_kernels_switch_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer's function is kept for the layer's life, so turning the kernels off and on (as the
    benchmarks do) must take effect on the next call, whenever the function was made."""
    from cvmkd_nmt.quantized import DynamicInt8Linear

    _int8_kernel_or_skip()
    library = kernels._library()
    assert library is not None
    calls: list[int] = []
    real = library.row_product_int8
    patched = kernels._Library(library.dropout, library.row_product, lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setattr(kernels, "_library", lambda: patched)
    monkeypatch.setattr(kernels, "enabled", False)
    layer = DynamicInt8Linear.from_linear(torch.nn.Linear(8, 5))
    fast = layer.as_function()
    with torch.inference_mode():
        fast(torch.ones(1, 8))
        assert calls == []
        monkeypatch.setattr(kernels, "enabled", True)
        assert layer.as_function() is fast  # the same function
        fast(torch.ones(1, 8))
    assert calls == [1]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 4096, 4099, 100003])
def test_without_the_kernel_dropout_gives_the_kernel_s_very_masks_outputs_and_gradients(
    fresh: Path, dtype: torch.dtype, n: int
) -> None:
    """The same random numbers (splitmix64 of a counter seeded by one draw from torch's
    generator), the same products rounded once, the same generator state after: a seeded run
    trains the same weights on a machine without a C compiler."""
    from cvmkd_nmt.model.transformer import dropout

    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype).requires_grad_(True)
    results = []
    for native in (True, False):
        kernels.enabled = native
        try:
            torch.manual_seed(5)
            out = dropout(x, 0.1, True)
            (grad,) = torch.autograd.grad(out.float().sum() * 1.7, x)
            results.append((out, grad, torch.get_rng_state()))
        finally:
            kernels.enabled = True
    (out, grad, state), (plain_out, plain_grad, plain_state) = results
    assert torch.equal(out, plain_out) and torch.equal(grad, plain_grad) and torch.equal(state, plain_state)
    if n > 1000:
        assert 0.08 < float((out == 0).float().mean()) < 0.12


@needs_compiler
def test_a_seeded_training_run_gives_the_same_weights_with_and_without_the_kernels(fresh: Path) -> None:
    """Training does not use the row products (they serve decoding); dropout's masks are the same:
    the weights after some steps are equal, tensor for tensor."""
    from cvmkd_nmt.model.presets import preset
    from cvmkd_nmt.model.transformer import CvmTransformer

    def train(native: bool) -> dict[str, torch.Tensor]:
        kernels.enabled = native
        try:
            torch.manual_seed(0)
            model = CvmTransformer(preset("tiny", dropout=0.2, vocab_size=50))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            src = torch.randint(4, 50, (6, 9))
            tgt = torch.randint(4, 50, (6, 8))
            for _ in range(5):
                logits = model(src, tgt[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tgt[:, 1:].reshape(-1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
        finally:
            kernels.enabled = True

    assert kernels.dropout_kernel(torch.ones(3)) is not None  # the kernel is there to compare with
    native, plain = train(True), train(False)
    assert all(torch.equal(native[k], plain[k]) for k in native)
