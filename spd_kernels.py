"""Fused kernels for the hot spots of an SPD step; spd_common.py uses them where they apply.

The default CI function, C scalar MLPs 1 -> H (GELU) -> 1, and the hard sigmoids after it, with
forward and backward each in one pass: on CPU in float32 a small C kernel (`ScalarGeluCI`, compiled
once with the system's C compiler and cached in ~/.cache/spd, or $SPD_CACHE_DIR); elsewhere broadcast
torch ops (`ScalarGeluMLP`). Values and gradients match the batched-matmul form to float32 rounding
(tests/test_ci_speed.py). SPD_CI_KERNEL=0 turns the C kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


# The default CI function, C scalar MLPs 1 -> H (GELU) -> 1 on a (batch, C) tensor, costs most of a TMS
# step when run as batched matmuls: inner widths 1 and H are elementwise work done badly by BLAS, and
# GELU's erf and exp over the (batch, C, H) hidden layer dominate what is left. On CPU a small C kernel
# (compiled once with the system's C compiler and cached; about 6x faster at 1 thread) does forward
# and backward in one pass each, recomputing the hidden layer in the backward instead of storing it,
# with rational/polynomial erf and exp accurate to a few float32 ulp. It also applies the hard sigmoids
# and their backward: on CPU each elementwise torch op streams a (batch, C) tensor through memory, and
# the sigmoids' dozen such passes cost more than the MLPs themselves. Elsewhere (GPU, float64, no
# compiler, SPD_CI_KERNEL=0) the same function runs as broadcast torch ops.
_CI_KERNEL_SRC = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* erf: Eigen's/XLA's float rational approximation on [-4, 4] (+-1 outside), a few ulp. */
static inline float erf_(float x) {
    x = x < -4.0f ? -4.0f : x; x = x > 4.0f ? 4.0f : x;
    float x2 = x * x;
    float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
    p = x2 * p + -2.10102402082508e-06f;
    p = x2 * p + -5.69250639462346e-05f;
    p = x2 * p + -7.34990630326855e-04f;
    p = x2 * p + -2.95459980854025e-03f;
    p = x2 * p + -1.60960333262415e-02f;
    float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
    q = x2 * q + -1.68282697438203e-03f;
    q = x2 * q + -7.37332916720468e-03f;
    q = x2 * q + -1.42647390514189e-02f;
    return x * p / q;
}
/* exp for x <= 0 (Cephes expf: range reduction to [-ln2/2, ln2/2], degree-5 polynomial). */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}
/* U[0, 1) noise without a sequential generator: element i is a hash of (seed, offset + i), 24 random bits
   as torch.rand's float32. Counter-based, so a process drawing only its rows of a global batch (offset: the
   index of its first element) gets exactly those rows of the global draw. About 5x faster than torch.rand
   (mt19937) here. The hash is lowbias32 (Wellons), twice, keyed by the seed; the counter is 32 bits, so a
   draw of over 2^32 elements would repeat itself. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
    return x;
}
void uniform_fill(float *out, long n, long offset, uint64_t seed) {
    const uint32_t k1 = mix32((uint32_t)seed ^ 0x9e3779b9U), k2 = mix32((uint32_t)(seed >> 32) + k1);
#pragma omp simd
    for (long i = 0; i < n; i++) {
        const uint32_t x = mix32(mix32((uint32_t)(offset + i) * 0x9e3779b9U + k1) ^ k2);
        out[i] = (float)(int32_t)(x >> 8) * 0x1p-24f;
    }
}

#define SQRT1_2 0.70710678118654752f
#define INV_SQRT_2PI 0.39894228040143268f

/* h (N, C) row-major, as torch holds it. The kernels run over tiles of BLK rows: a tile is read row by
   row into (C, BLK) buffers, so that the SIMD loops run along n over contiguous memory, and the results
   are written back row by row. Nothing is transposed in torch, and every array is read or written once. */
#define BLK 256

static void load_tile(const float *x, long n0, int nb, int C, float *tile) {
    for (int j = 0; j < nb; j++)
        for (int c = 0; c < C; c++) tile[(long)c * BLK + j] = x[(n0 + j) * C + c];
}

static void store_tile(const float *tile, long n0, int nb, int C, float *x) {
    for (int j = 0; j < nb; j++)
        for (int c = 0; c < C; c++) x[(n0 + j) * C + c] = tile[(long)c * BLK + j];
}

/* pre, lower, upper (N, C): pre[n,c] = b2[c] + sum_k w2[c,k] gelu(h[n,c] w1[c,k] + b1[c,k]), and the two
   hard sigmoids of pre (HardSigmoids in spd_ci.py): lower = slope x below 0 (clamp_lower: 0), x on
   [0, 1], 1 above; upper = 0 below 0, x on [0, 1], 1 + slope (x - 1) above. Returns -1 if out of memory. */
int ci_forward(const float *h, int N, int C, int H, const float *w1, const float *b1, const float *w2,
               const float *b2, float slope, int clamp_lower, float *pre, float *lower, float *upper) {
    float *hb = malloc(sizeof(float) * 4 * C * BLK);
    if (!hb) return -1;
    float *ob = hb + (long)C * BLK, *lb = ob + (long)C * BLK, *ub = lb + (long)C * BLK;
    for (long n0 = 0; n0 < N; n0 += BLK) {
        const int nb = N - n0 < BLK ? (int)(N - n0) : BLK;
        load_tile(h, n0, nb, C, hb);
        for (int c = 0; c < C; c++) {
            const float *hc = hb + (long)c * BLK;
            float *oc = ob + (long)c * BLK, *lc = lb + (long)c * BLK, *uc = ub + (long)c * BLK;
            for (int j = 0; j < nb; j++) oc[j] = b2[c];
            for (int k = 0; k < H; k++) {
                const float a = w1[c * H + k], b = b1[c * H + k], w = w2[c * H + k];
#pragma omp simd
                for (int j = 0; j < nb; j++) {
                    float p = hc[j] * a + b;
                    oc[j] += w * (p * (0.5f + 0.5f * erf_(p * SQRT1_2)));
                }
            }
#pragma omp simd
            for (int j = 0; j < nb; j++) {
                const float x = oc[j];
                lc[j] = x < 0.0f ? (clamp_lower ? 0.0f : slope * x) : (x > 1.0f ? 1.0f : x);  /* +0, as torch */
                uc[j] = x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f + slope * (x - 1.0f) : x);
            }
        }
        store_tile(ob, n0, nb, C, pre);
        store_tile(lb, n0, nb, C, lower);
        store_tile(ub, n0, nb, C, upper);
    }
    free(hb);
    return 0;
}

/* Given the gradients of pre, lower, upper (N, C; NULL: zero): dh (N, C), dw1, db1, dw2 (C, H), db2 (C).
   The gradient of pre is g_pre plus, on [0, 1], g_lo + g_up; below 0, slope g_lo (clamp_lower: only where
   g_lo < 0, which pushes x up); above 1, slope g_up. Recomputes the hidden layer instead of storing it.
   Returns -1 if out of memory. */
int ci_backward(const float *h, const float *pre, const float *g_pre, const float *g_lo, const float *g_up,
                int N, int C, int H, const float *w1, const float *b1, const float *w2, float slope,
                int clamp_lower, float *dh, float *dw1, float *db1, float *dw2, float *db2) {
    float *hb = calloc((size_t)6 * C * BLK, sizeof(float));  /* zeros: a NULL gradient reads as 0 */
    if (!hb) return -1;
    float *xb = hb + (long)C * BLK, *gpb = xb + (long)C * BLK, *glb = gpb + (long)C * BLK;
    float *gub = glb + (long)C * BLK, *db = gub + (long)C * BLK;
    memset(dw1, 0, sizeof(float) * C * H); memset(db1, 0, sizeof(float) * C * H);
    memset(dw2, 0, sizeof(float) * C * H); memset(db2, 0, sizeof(float) * C);
    for (long n0 = 0; n0 < N; n0 += BLK) {
        const int nb = N - n0 < BLK ? (int)(N - n0) : BLK;
        load_tile(h, n0, nb, C, hb);
        load_tile(pre, n0, nb, C, xb);
        if (g_pre) load_tile(g_pre, n0, nb, C, gpb);
        else memset(gpb, 0, sizeof(float) * C * BLK);  /* the previous tile's gradient is there */
        if (g_lo) load_tile(g_lo, n0, nb, C, glb);
        if (g_up) load_tile(g_up, n0, nb, C, gub);
        for (int c = 0; c < C; c++) {
            const long o = (long)c * BLK;
            const float *hc = hb + o;
            float *gc = gpb + o, *dc = db + o, sg = 0.0f;
#pragma omp simd reduction(+:sg)
            for (int j = 0; j < nb; j++) {  /* gc: the gradient of pre, in place of g_pre */
                const float x = xb[o + j], gl = glb[o + j], gu = gub[o + j];
                const float below = (clamp_lower && !(gl < 0.0f)) ? 0.0f : slope * gl;
                gc[j] += x < 0.0f ? below : (x > 1.0f ? slope * gu : gl + gu);
                dc[j] = 0.0f;
                sg += gc[j];
            }
            db2[c] += sg;
            for (int k = 0; k < H; k++) {
                const float a = w1[c * H + k], b = b1[c * H + k], w = w2[c * H + k];
                float s_w1 = 0.0f, s_b1 = 0.0f, s_w2 = 0.0f;
#pragma omp simd reduction(+:s_w1, s_b1, s_w2)
                for (int j = 0; j < nb; j++) {
                    float p = hc[j] * a + b;
                    float cdf = 0.5f + 0.5f * erf_(p * SQRT1_2);
                    float pdf = INV_SQRT_2PI * exp_neg(-0.5f * p * p);
                    float dp = gc[j] * w * (cdf + p * pdf);
                    dc[j] += dp * a;
                    s_w1 += dp * hc[j];
                    s_b1 += dp;
                    s_w2 += gc[j] * p * cdf;
                }
                dw1[c * H + k] += s_w1;
                db1[c * H + k] += s_b1;
                dw2[c * H + k] += s_w2;
            }
        }
        store_tile(db, n0, nb, C, dh);
    }
    free(hb);
    return 0;
}
"""


@functools.cache
def _ci_kernel() -> ctypes.CDLL | None:
    """The compiled CI kernel, or None (SPD_CI_KERNEL=0, no C compiler, or it failed: one warning)."""
    if os.environ.get("SPD_CI_KERNEL", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    key = hashlib.sha256("\0".join([_CI_KERNEL_SRC, cc, *flags, platform.machine()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SPD_CACHE_DIR", Path.home() / ".cache" / "spd"))
    lib_path = cache / f"ci_kernel_{key}.so"
    try:
        if not lib_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # compile beside the cache, then rename
                src, out = Path(tmp) / "ci_kernel.c", Path(tmp) / "ci_kernel.so"
                src.write_text(_CI_KERNEL_SRC)
                subprocess.run([cc, *flags, "-o", str(out), str(src), "-lm"], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(out, lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        warnings.warn(f"the CI kernel did not build ({' '.join(str(detail).split())[:200]}); using torch ops "
                      f"(slower; set SPD_CI_KERNEL=0 to skip trying)")
        return None
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.ci_forward.restype = lib.ci_backward.restype = i32  # 0, or -1: out of memory
    lib.ci_forward.argtypes = [ptr, i32, i32, i32, ptr, ptr, ptr, ptr, f32, i32, ptr, ptr, ptr]
    lib.ci_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, i32, i32, i32, ptr, ptr, ptr, f32, i32,
                                ptr, ptr, ptr, ptr, ptr]
    lib.uniform_fill.restype = None
    lib.uniform_fill.argtypes = [ptr, ctypes.c_long, ctypes.c_long, ctypes.c_uint64]
    return lib


def _kernel_runs(device: torch.device | str, numel: int) -> bool:
    """Whether the C kernels can fill `numel` elements on `device`: on CPU, under 2^31, with the kernel built."""
    return torch.device(device).type == "cpu" and numel < 2 ** 31 and _ci_kernel() is not None


def use_ci_kernel(*tensors: Tensor) -> bool:
    """Whether ScalarGeluCI can run on these tensors: float32 on CPU, with the kernel built."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and \
        _kernel_runs(tensors[0].device, tensors[0].numel())


def _mul32(x: Any, c: int) -> Any:
    """(x * c) mod 2^32 for x in [0, 2^32) (an int, or an int64 tensor), without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(x: Any) -> Any:
    """The kernel's lowbias32 hash (mix32) on uint32 values held in ints or int64 tensors."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(shape: torch.Size, offset: int = 0, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> Tensor:
    """U[0, 1) float32 noise of `shape`: element i hashes (a seed drawn from `generator`, offset + i), so the
    rows of a larger draw are this call with their offset. The same numbers on every machine: the C
    kernel's uniform_fill where it runs (CPU), the same hash in torch ops elsewhere (no compiler, GPU)."""
    seed = int(torch.randint(0, 2 ** 62, (), generator=generator, device=generator.device if generator else "cpu"))
    if _kernel_runs(device, math.prod(shape)):
        out = torch.empty(shape, dtype=torch.float32, device="cpu")
        _ci_kernel().uniform_fill(out.data_ptr(), out.numel(), offset, seed)
        return out
    k1 = _mix32((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    k2 = _mix32(((seed >> 32) + k1) & 0xFFFFFFFF)
    counter = (torch.arange(math.prod(shape), dtype=torch.int64, device=device) + offset) & 0xFFFFFFFF
    x = _mix32(_mix32((_mul32(counter, 0x9E3779B9) + k1) & 0xFFFFFFFF) ^ k2)
    return ((x >> 8).to(torch.float32) * 2.0 ** -24).view(shape)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class ScalarGeluCI(torch.autograd.Function):
    """The C kernel: C independent MLPs 1 -> H (GELU) -> 1, one per column of h (N, C), and the two
    hard sigmoids of their outputs, in one pass: (pre, lower, upper), each (N, C). Weights w1, b1, w2
    as (C, H), b2 as (C,); `clamp_lower`: spd.sigmoid is clamp_forward_leaky_backward. The backward is
    one pass too, from whichever of the three outputs have gradients."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, clamp_lower: bool,
                slope: float) -> tuple[Tensor, Tensor, Tensor]:
        h, w1, b1, w2, b2 = (t.contiguous() for t in (h, w1, b1, w2, b2))
        (N, C), H = h.shape, w1.shape[1]
        pre, lower, upper = (h.new_empty(N, C) for _ in range(3))  # new_empty: on cpu whatever the default device
        if _ci_kernel().ci_forward(h.data_ptr(), N, C, H, w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(),
                                   slope, int(clamp_lower), pre.data_ptr(), lower.data_ptr(), upper.data_ptr()):
            raise MemoryError("the CI kernel could not allocate its buffers")
        ctx.save_for_backward(h, pre, w1, b1, w2)
        ctx.clamp_lower, ctx.slope = clamp_lower, slope
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to read
        return pre, lower, upper

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_pre: Tensor | None, g_lo: Tensor | None, g_up: Tensor | None) -> tuple[Tensor | None, ...]:
        h, pre, w1, b1, w2 = ctx.saved_tensors
        (N, C), H = h.shape, w1.shape[1]
        g_pre, g_lo, g_up = (None if g is None else g.contiguous().float() for g in (g_pre, g_lo, g_up))
        dh, dw1, db1, dw2, db2 = (h.new_empty(N, C), w1.new_empty(C, H), w1.new_empty(C, H), w1.new_empty(C, H),
                                  w1.new_empty(C))
        if _ci_kernel().ci_backward(h.data_ptr(), pre.data_ptr(), _ptr(g_pre), _ptr(g_lo), _ptr(g_up), N, C, H,
                                    w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), ctx.slope, int(ctx.clamp_lower),
                                    dh.data_ptr(), dw1.data_ptr(), db1.data_ptr(), dw2.data_ptr(), db2.data_ptr()):
            raise MemoryError("the CI kernel could not allocate its buffers")
        return dh, dw1, db1, dw2, db2, None, None


class ScalarGeluMLP(torch.autograd.Function):
    """The same MLPs as broadcast torch ops, for where the kernel does not run (GPU, float64, no compiler):
    h (N, C) -> pre (N, C). The (N, C, H) hidden layer is one addcmul, and the backward reuses the
    forward's pre-activations and activations instead of autograd's per-op backward."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        pre = torch.addcmul(b1, h.unsqueeze(-1), w1)  # (N, C, H)
        act = F.gelu(pre)
        ctx.save_for_backward(h, w1, w2, pre, act)
        return (act * w2).sum(-1).add_(b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, ...]:
        h, w1, w2, pre, act = ctx.saved_tensors
        g3 = g.unsqueeze(-1)
        dpre = torch.ops.aten.gelu_backward(g3 * w2, pre)  # (N, C, H)
        return (dpre * w1).sum(-1), (dpre * h.unsqueeze(-1)).sum(0), dpre.sum(0), (act * g3).sum(0), g.sum(0)


# The KL output loss of a language model compares (positions, vocabulary)-sized logits, 49k wide for
# SmolLM2, once per masked forward. Written as torch ops, autograd keeps two such tensors per forward for
# the backward (the prediction's log-softmax and the target's probabilities), and the forward makes several
# more at once; its gradient with respect to the predicted logits, softmax(pred) - softmax(target), is one.
# `KLDivLogits` computes the loss and that gradient together, a chunk of positions at a time (the
# temporaries of one chunk only), and keeps only the gradient.
class KLDivLogits(torch.autograd.Function):
    """KL(softmax(target) || softmax(pred)) over the last axis, mean over the positions: pred, target
    (..., V) -> (). Differentiable in pred only (the target's logits are constants of the step)."""

    CHUNK = 1024  # positions per chunk

    @staticmethod
    def forward(ctx: Any, pred: Tensor, target: Tensor) -> Tensor:
        pred2, target2 = pred.detach().reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
        n = pred2.shape[0]
        grad = torch.empty_like(pred2) if ctx.needs_input_grad[0] else None  # none in evaluation
        total = torch.zeros((), device=pred.device)
        for s in range(0, n, KLDivLogits.CHUNK):
            logq = F.log_softmax(pred2[s:s + KLDivLogits.CHUNK].float(), -1)
            logp = F.log_softmax(target2[s:s + KLDivLogits.CHUNK].float(), -1)
            p = logp.exp()
            total += (p * (logp - logq)).sum()
            if grad is not None:
                grad[s:s + KLDivLogits.CHUNK] = (logq.exp_() - p) / n
        ctx.save_for_backward(grad)
        ctx.shape = pred.shape
        return total / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return (grad * g).view(ctx.shape), None
