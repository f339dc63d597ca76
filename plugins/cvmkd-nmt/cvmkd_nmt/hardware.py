"""Device and precision: what ``run.device`` and ``run.precision = "auto"`` resolve to, and autocast."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
from contextlib import AbstractContextManager
from typing import Any

# oneDNN, which runs torch's bf16 matrix products on a CPU, builds a kernel ("primitive") for
# each new shape: ~3 ms against ~1 ms for the product itself at a student's sizes. Training
# batches come in many shapes (lengths vary), more than its default cache of 1,024 holds, so it
# kept rebuilding them: a larger cache (read once, when the first product runs) made the
# student's step 1.3x faster from the second epoch on. Set before torch computes anything.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "65536")

import torch  # noqa: E402

from cvmkd_core.errors import CvmkdError  # noqa: E402


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str | None:
    """``/proc/cpuinfo`` (its flags say which instructions the CPU has), or None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    flags = _cpuinfo()
    if flags is None:
        return platform.machine() == "arm64"  # Apple silicon runs bf16 natively
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_int8_dot() -> bool:
    """True when the CPU multiplies and adds int8 in 32 bits (AVX512-VNNI, AVX-VNNI or AMX).
    Without it, fbgemm's AVX2 kernels add pairs of u8 x s8 products in int16, which can saturate
    when a static-int8 layer's inputs use all 8 bits (``reduce_range=False``)."""
    flags = _cpuinfo() or ""
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def find_compiler(variable: str, names: tuple[str, ...]) -> str | None:
    """The compiler named by the environment variable ``variable`` (``CC``, ``CXX``) when set, else
    the first of ``names`` on the PATH; None where there is none."""
    preferred = os.environ.get(variable)
    return next(
        (found for name in (*([preferred] if preferred else []), *names) if (found := shutil.which(name))), None
    )


def resolve_device(requested: str, what: str = "run.device") -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise CvmkdError(f"{what}: unknown device {requested!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CvmkdError(f"{what}: {requested!r} was asked for but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CvmkdError(f"{what}: {requested!r}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA that supports it and on CPUs with native bf16, else fp32."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise CvmkdError("run.precision: 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CvmkdError("run.precision: this CUDA device does not support bf16; use 'fp16' or 'fp32'")
    return requested


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """Mixed precision for forward passes; a no-op in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe_hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "cpu_int8_dot": cpu_has_int8_dot(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
