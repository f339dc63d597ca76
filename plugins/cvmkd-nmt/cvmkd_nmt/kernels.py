"""Small C kernels, built with the machine's C compiler at first use: dropout masks in one pass,
and the product of a few rows with a float32 or dynamic-int8 weight matrix (decoding one sentence).

**Dropout.** On a CPU, dropout through torch draws random numbers (Mersenne Twister), compares
them, casts the mask to the activations' dtype, scales it and multiplies: five passes, and one
more in the backward. Over a student's KD step (32 pairs, 11M dropped elements) that was about 30
ms of ~200. This kernel draws 16-bit random numbers from splitmix64 over a counter (seeded from
torch's generator, so ``torch.manual_seed`` and a run's saved RNG state still decide the masks),
writes the output and a one-byte mask in the same loop, and the backward multiplies by the mask
in one more: 7-10x faster than torch's passes on a 1.5M-element bf16 activation, single-threaded.

**Few-row products.** Decoding one sentence multiplies one row (a beam: a few) by each weight
matrix of the decoder, and the weights (28 MB for the shipped teacher) no longer fit the cache,
so a generated token costs one read of them from memory. torch's float32 product reads a
(768 x 256) matrix at 8-9 GB/s on the 2-core EPYC where this copy streams at 24 GB/s;
:func:`row_product` reads each weight row once, in order, and takes its dot product with every
input row while it is in the L1 cache: 20-22 GB/s, 2.1-2.7x torch's product for one row and
1.2-2.6x for four, and slower from eight rows on (measured per shape, weights cold).
:func:`int8_row_product` does the same for torch's dynamic int8 product, step for step and with
the same values, where the CPU has AVX512-VNNI.

The shared library is compiled once per source and CPU (``-O3 -march=native``) into
``$XDG_CACHE_HOME/cvmkd/kernels`` (default ``~/.cache``), a folder only its owner may write
(0700); its sha256, recorded when it was built, is checked before every load, and a library that
does not match is built again, never loaded. Where that folder is not private to the user, the
library is built in a private temporary folder for the process. Where no C compiler is found or the build
fails, :func:`dropout_kernel` and :func:`row_product` return None and :func:`int8_row_product`
torch's kernel, and their callers use torch's operations (the same results: the dropout
distribution; the float32 product within rounding; the int8 product exactly).
``CVMKD_NATIVE_KERNELS=0`` turns them all off.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cvmkd_nmt.hardware import _cpuinfo, find_compiler

log = logging.getLogger("cvmkd")

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* splitmix64 (Steele, Lea & Flood 2014) of a counter: every block of four 16-bit numbers is
   independent, so the loops vectorize */
static inline uint64_t mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u; memcpy(&u, &f, 4);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)((u >> 16) | 0x40u) : rounded;
}

#define CHUNK 4096

/* keep[i] = (16-bit random number i) >= cut; out[i] = x[i] * (keep[i] ? scale : 0) */
#define DROPOUT(NAME, T, LOAD, STORE)                                                          \
void NAME(const T *x, T *out, uint8_t *keep, int64_t n, uint64_t seed, uint32_t cut, float scale) { \
    uint16_t r16[CHUNK];                                                                       \
    for (int64_t start = 0; start < n; start += CHUNK) {                                       \
        uint64_t *r64 = (uint64_t *)r16;                                                       \
        uint64_t base = seed + (uint64_t)(start / 4);                                          \
        for (int b = 0; b < CHUNK / 4; b++) r64[b] = mix(base + (uint64_t)b);                  \
        int64_t len = n - start < CHUNK ? n - start : CHUNK;                                   \
        const T *xs = x + start; T *os = out + start; uint8_t *ks = keep + start;              \
        for (int64_t i = 0; i < len; i++) {                                                    \
            uint8_t k = r16[i] >= cut;                                                         \
            ks[i] = k;                                                                         \
            os[i] = STORE(LOAD(xs[i]) * (k ? scale : 0.0f));                                   \
        }                                                                                      \
    }                                                                                          \
}

/* out[i] = g[i] * (keep[i] ? scale : 0): the backward */
#define APPLY(NAME, T, LOAD, STORE)                                                            \
void NAME(const T *g, const uint8_t *keep, T *out, int64_t n, float scale) {                   \
    for (int64_t i = 0; i < n; i++) out[i] = STORE(LOAD(g[i]) * (keep[i] ? scale : 0.0f));     \
}

#define SAME(v) (v)
DROPOUT(dropout_f32, float, SAME, SAME)
DROPOUT(dropout_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
APPLY(apply_f32, float, SAME, SAME)
APPLY(apply_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* y[m, n] = b[n] + sum_k x[m, k] * w[n, k] for m < rows: x's rows ldx apart, w (n_out x k)
   contiguous, y (rows x n_out) contiguous, b may be NULL. Each weight row is read from memory once,
   in order, and meets every input row while it is in the L1 cache. */
void row_product_f32(const float *x, int64_t ldx, const float *w, const float *b, float *y,
                     int64_t rows, int64_t n_out, int64_t k) {
    for (int64_t n = 0; n < n_out; n++) {
        const float *wn = w + n * k;
        float bias = b ? b[n] : 0.0f;
        for (int64_t m = 0; m < rows; m++) {
            const float *xm = x + m * ldx;
            float acc = 0.0f;
            #pragma omp simd reduction(+:acc)
            for (int64_t i = 0; i < k; i++) acc += xm[i] * wn[i];
            y[m * n_out + n] = acc + bias;
        }
    }
}

/* torch's dynamic int8 product (torch.ops.quantized.linear_dynamic on fbgemm), step for step:
   the input quantized to uint8 with one scale and zero point over all its elements
   (ChooseQuantizationParams), u8 x s8 products summed in int32, and the float epilogue
   (acc - zero_point * row sum) * (input scale * row scale) + bias as one fused multiply-add.
   Only with AVX512-VNNI, whose vpdpbusd sums u8 x s8 products in int32 without saturating, as
   fbgemm does on such CPUs; elsewhere int8_vnni is 0 and the caller keeps torch's kernel. */
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>
const int int8_vnni = 1;
static inline int32_t dot_u8s8(const uint8_t *a, const int8_t *b, int64_t k) {
    __m512i acc = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 64 <= k; i += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512((const void *)(a + i)), _mm512_loadu_si512((const void *)(b + i)));
    int32_t s = _mm512_reduce_add_epi32(acc);
    for (; i < k; i++) s += (int32_t)a[i] * (int32_t)b[i];
    return s;
}
#else
const int int8_vnni = 0;
static inline int32_t dot_u8s8(const uint8_t *a, const int8_t *b, int64_t k) {
    int32_t s = 0;
    for (int64_t i = 0; i < k; i++) s += (int32_t)a[i] * (int32_t)b[i];
    return s;
}
#endif

#define SMALL_SCALE 6.1e-5f

/* returns 0, or -1 where the scratch memory could not be allocated (y untouched) */
int row_product_int8(const float *x, int64_t ldx, const int8_t *w, const float *w_scale, const int32_t *w_sum,
                     const float *b, float *y, int64_t rows, int64_t n_out, int64_t k, int reduce_range) {
    float lo = 0.0f, hi = 0.0f;  /* the range always holds 0 */
    for (int64_t m = 0; m < rows; m++)
        for (int64_t i = 0; i < k; i++) {
            float v = x[m * ldx + i];
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
    int32_t qmin = 0, qmax = reduce_range ? 127 : 255;
    double scale = ((double)hi - lo) / (qmax - qmin);
    if ((float)scale == 0.0f || isinf(1.0f / (float)scale)) scale = 0.1;
    if (scale < SMALL_SCALE) {
        float original = (float)scale;
        scale = SMALL_SCALE;
        if (lo == 0.0f) hi = SMALL_SCALE * (qmax - qmin);
        else if (hi == 0.0f) lo = -SMALL_SCALE * (qmax - qmin);
        else { float amplifier = SMALL_SCALE / original; lo *= amplifier; hi *= amplifier; }
    }
    double from_min = qmin - lo / scale, from_max = qmax - hi / scale;
    double error_min = fabs((double)qmin) - fabs(lo / scale), error_max = fabs((double)qmax) - fabs(hi / scale);
    double initial = error_min < error_max ? from_min : from_max;
    int32_t zero = initial < qmin ? qmin : initial > qmax ? qmax : (int32_t)nearbyint(initial);
    float x_scale = (float)scale, inverse = 1.0f / x_scale, zero_f = (float)zero;
    uint8_t *q = malloc((size_t)(rows * k) + 1);
    if (!q) return -1;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t i = 0; i < k; i++) {
            float t = nearbyintf(fmaf(x[m * ldx + i], inverse, zero_f));
            q[m * k + i] = (uint8_t)(t < 0.0f ? 0.0f : t > 255.0f ? 255.0f : t);
        }
    for (int64_t n = 0; n < n_out; n++) {
        const int8_t *wn = w + n * k;
        float multiplier = x_scale * w_scale[n];
        for (int64_t m = 0; m < rows; m++) {
            float raw = (float)(dot_u8s8(q + m * k, wn, k) - zero * w_sum[n]);
            y[m * n_out + n] = b ? fmaf(raw, multiplier, b[n]) : raw * multiplier;
        }
    }
    free(q);
    return 0;
}
"""

# -fopenmp-simd: the reduction pragma vectorizes the dot product; no OpenMP runtime is linked
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC"]

_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}

#: False sends dropout and the few-row products through torch's operations in this process
#: (benchmarks compare the two)
enabled = True

#: the most input rows :func:`row_product` takes: from eight on, torch's product was as fast
MAX_ROWS = 4
#: the most input rows :func:`int8_row_product` takes: with four, torch's kernel was faster on the
#: (6,000 x 256) output projection
MAX_ROWS_INT8 = 2


def _cache_dir() -> Path:
    """The user's private kernel folder: ``$XDG_CACHE_HOME/cvmkd/kernels`` (``~/.cache`` without
    it; a per-user temporary folder without a home), made 0700, or a fresh private temporary
    folder where that one is another user's or others may write to it."""
    root = os.environ.get("XDG_CACHE_HOME")
    if not root:
        try:
            root = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no home in the password database
            root = str(Path(tempfile.gettempdir()) / f"cvmkd-{os.getuid()}")
    folder = Path(root) / "cvmkd" / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        status = folder.stat()
        if status.st_uid != os.getuid() or status.st_mode & 0o022:
            raise PermissionError(
                f"{folder} is not private to this user (owner {status.st_uid}, mode {oct(status.st_mode & 0o777)})"
            )
    except OSError as error:
        log.warning("cvmkd's C kernels: %s; building them in a private temporary folder", error)
        return Path(tempfile.mkdtemp(prefix="cvmkd-kernels-"))
    return folder


def _trusted(library: Path) -> bool:
    """Whether ``library`` is the one this user built: its own file, that nobody else may write,
    matching the sha256 recorded when it was built."""
    record = library.with_name(library.name + ".sha256")
    try:
        status = library.stat()
        if status.st_uid != os.getuid() or status.st_mode & 0o022:
            return False
        return record.read_text("utf-8").strip() == hashlib.sha256(library.read_bytes()).hexdigest()
    except (OSError, ValueError):
        return False


def _cpu_key() -> str:
    """What ``-march=native`` compiles for: the CPU's model and flags."""
    info = _cpuinfo() or platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(lines) or info


def _build() -> Path | None:
    """The compiled library (built now unless cached), or None where it cannot be built."""
    compiler = find_compiler("CC", ("cc", "gcc", "clang"))
    if compiler is None:
        log.info("no C compiler found: dropout and few-row products run through torch's operations")
        return None
    key = hashlib.sha256("\n".join([SOURCE, *FLAGS, compiler, _cpu_key()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    if _trusted(target):
        return target
    if target.exists():
        log.warning("cvmkd's C kernels: %s does not match the library built here: building it again", target)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            source = Path(scratch) / "kernels.c"
            source.write_text(SOURCE)
            built = Path(scratch) / "kernels.so"
            subprocess.run(
                [compiler, *FLAGS, str(source), "-o", str(built)], check=True, capture_output=True, timeout=120
            )
            built.chmod(0o700)
            digest = hashlib.sha256(built.read_bytes()).hexdigest()
            record = Path(scratch) / "record"
            record.write_text(digest + "\n", encoding="utf-8")
            # atomic: a concurrent process sees the whole library or none; the record comes last,
            # so a library without its record is built again rather than trusted
            os.replace(built, target)
            os.replace(record, target.with_name(target.name + ".sha256"))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        log.warning(
            "could not build cvmkd's C kernels (%s%s): dropout and few-row products run through torch's operations",
            type(error).__name__,
            f": {detail.decode(errors='replace').strip().splitlines()[0]}" if detail.strip() else "",
        )
        return None
    return target


@dataclasses.dataclass(frozen=True)
class _Library:
    """The loaded kernels: (dropout, backward) C functions by dtype, the float32 row product, and
    the dynamic int8 one (None where the CPU has no AVX512-VNNI)."""

    dropout: dict[torch.dtype, tuple[Any, Any]]
    row_product: Any
    row_product_int8: Any


@functools.lru_cache(maxsize=1)
def _library() -> _Library | None:
    """The loaded kernels, or None where there are none."""
    if os.environ.get("CVMKD_NATIVE_KERNELS", "1") == "0":
        return None
    path = _build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        log.warning("could not load cvmkd's C kernels (%s): dropout and few-row products run through torch", error)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    functions = {}
    for dtype, kind in _DTYPES.items():
        forward, backward = getattr(lib, f"dropout_{kind}"), getattr(lib, f"apply_{kind}")
        forward.argtypes = [pointer, pointer, pointer, size, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float]
        backward.argtypes = [pointer, pointer, pointer, size, ctypes.c_float]
        forward.restype = backward.restype = None
        functions[dtype] = (forward, backward)
    product = lib.row_product_f32
    product.argtypes = [pointer, size, pointer, pointer, pointer, size, size, size]
    product.restype = None
    product_int8 = None
    if ctypes.c_int.in_dll(lib, "int8_vnni").value:
        product_int8 = lib.row_product_int8
        product_int8.argtypes = [
            pointer,
            size,
            pointer,
            pointer,
            pointer,
            pointer,
            pointer,
            size,
            size,
            size,
            ctypes.c_int,
        ]
        product_int8.restype = ctypes.c_int
    return _Library(dropout=functions, row_product=product, row_product_int8=product_int8)


class _Dropout(torch.autograd.Function):
    """Dropout through the C kernel; the backward multiplies by the saved one-byte mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cut: int, scale: float) -> torch.Tensor:  # type: ignore[override]
        library = _library()
        assert library is not None  # dropout_kernel() hands this out only where the kernel is
        functions = library.dropout
        x = x.contiguous()
        out = torch.empty_like(x)
        keep = torch.empty(x.shape, dtype=torch.uint8)
        seed = int(torch.empty((), dtype=torch.int64).random_())  # from torch's generator: seeded runs repeat
        functions[x.dtype][0](x.data_ptr(), out.data_ptr(), keep.data_ptr(), x.numel(), seed, cut, scale)
        ctx.save_for_backward(keep)
        ctx.scale, ctx.c_backward = scale, functions[x.dtype][1]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        ctx.c_backward(grad.data_ptr(), keep.data_ptr(), out.data_ptr(), grad.numel(), ctx.scale)
        return out, None, None


def dropout_kernel(x: torch.Tensor) -> Any:
    """The C dropout for ``x`` (``fn(x, cut, scale)``: elements whose 16-bit random number is
    below ``cut`` are zeroed, the rest multiplied by ``scale``), or None where it does not apply:
    a tensor off the CPU or of another dtype, or no kernel on this machine."""
    if not enabled or x.device.type != "cpu" or x.dtype not in _DTYPES or _library() is None:
        return None
    return _Dropout.apply


def _few_rows(x: torch.Tensor, k: int, max_rows: int) -> bool:
    """Whether the row products take ``x``: a float32 CPU matrix of at most ``max_rows`` rows of
    ``k`` adjacent values (the rows themselves may be apart)."""
    return (
        x.dim() == 2
        and x.size(0) <= max_rows
        and x.size(1) == k
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.stride(1) == 1
    )


def row_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``F.linear(x, weight, bias)`` for inputs of at most :data:`MAX_ROWS` rows through the C
    row product, torch's product for larger ones; None where it does not apply: no kernel on this
    machine, weights off the CPU or not float32, weights that need gradients while gradients are
    recorded, or CPU autocast on (its products run in bf16, and a few-row batch must decode as a
    larger one does). The weight and bias are taken as they are now (valid while they do not
    change)."""
    library = _library() if enabled else None
    if (
        library is None
        or torch.is_autocast_enabled("cpu")
        or weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or weight.dim() != 2
        or (bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"))
        or (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)))
    ):
        return None
    product = library.row_product
    w = weight.detach().contiguous()
    b = None if bias is None else bias.detach().contiguous()
    n_out, k = w.shape

    def linear(x: torch.Tensor) -> torch.Tensor:
        if not _few_rows(x, k, MAX_ROWS):
            return F.linear(x, w, b)
        rows = x.size(0)
        out = torch.empty((rows, n_out), dtype=torch.float32)
        product(
            x.data_ptr(), x.stride(0), w.data_ptr(), None if b is None else b.data_ptr(), out.data_ptr(), rows, n_out, k
        )
        return out

    return linear


def int8_row_product(
    data: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    reduce_range: bool,
    kernel: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's dynamic int8 product ``kernel`` (int8 weights ``data`` (out, in), per-row float
    ``scale``, zero points 0; the input quantized per tensor, 7 bits with ``reduce_range``) with
    inputs of at most :data:`MAX_ROWS_INT8` float32 rows run by the C kernel: the same steps and
    the same values (AVX512-VNNI only; measured equal to torch's fbgemm output bit for bit), and
    1.5-2.9x faster for one row (measured per decoder shape). ``kernel`` itself where the C
    kernel does not apply."""
    # `enabled` is read at each call, not here: callers keep this function for the layer's life
    library = _library()
    if library is None or library.row_product_int8 is None or data.device.type != "cpu":
        return kernel
    product = library.row_product_int8
    w = data.detach().to(torch.int8).contiguous()
    w_scale = scale.detach().to(torch.float32).reshape(-1).contiguous()
    w_sum = w.sum(dim=1, dtype=torch.int32).contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    n_out, k = w.shape

    def linear(x: torch.Tensor) -> torch.Tensor:
        if not enabled or not _few_rows(x, k, MAX_ROWS_INT8):  # benchmarks turn the kernels off and on
            return kernel(x)
        rows = x.size(0)
        out = torch.empty((rows, n_out), dtype=torch.float32)
        status = product(
            x.data_ptr(),
            x.stride(0),
            w.data_ptr(),
            w_scale.data_ptr(),
            w_sum.data_ptr(),
            None if b is None else b.data_ptr(),
            out.data_ptr(),
            rows,
            n_out,
            k,
            reduce_range,
        )
        if status != 0:  # no scratch memory
            return kernel(x)
        return out

    return linear
