"""Fused kernels for the hot spots of an SPD step; spd_common.py uses them where they apply.

`ScalarGeluMLP`: the default CI function, C scalar MLPs 1 -> H (GELU) -> 1, with forward and backward
each in one pass: on CPU in float32 a small C kernel (compiled once with the system's C compiler and
cached in ~/.cache/spd, or $SPD_CACHE_DIR); elsewhere broadcast torch ops. Values and gradients
match the batched-matmul form to float32 rounding (tests/test_ci_speed.py). SPD_CI_KERNEL=0 turns the
C kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
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
# with rational/polynomial erf and exp accurate to a few float32 ulp. Elsewhere (GPU, float64, no
# compiler, SPD_CI_KERNEL=0) the same function runs as broadcast torch ops.
_CI_KERNEL_SRC = r"""
#include <math.h>
#include <stdint.h>
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
#define SQRT1_2 0.70710678118654752f
#define INV_SQRT_2PI 0.39894228040143268f

/* h (C, N) -> out (C, N): out[c] = b2[c] + sum_k w2[c,k] gelu(h[c] w1[c,k] + b1[c,k]). */
void ci_forward(const float *h, int C, int N, int H, const float *w1, const float *b1, const float *w2,
                const float *b2, float *out) {
    for (int c = 0; c < C; c++) {
        const float *hc = h + (long)c * N;
        float *oc = out + (long)c * N;
        for (int n = 0; n < N; n++) oc[n] = b2[c];
        for (int k = 0; k < H; k++) {
            const float a = w1[c * H + k], b = b1[c * H + k], w = w2[c * H + k];
#pragma omp simd
            for (int n = 0; n < N; n++) {
                float p = hc[n] * a + b;
                oc[n] += w * (p * (0.5f + 0.5f * erf_(p * SQRT1_2)));
            }
        }
    }
}

/* Given g = dL/dout (C, N): dh (C, N), dw1, db1, dw2 (C, H), db2 (C). Recomputes the hidden layer. */
void ci_backward(const float *h, const float *g, int C, int N, int H, const float *w1, const float *b1,
                 const float *w2, float *dh, float *dw1, float *db1, float *dw2, float *db2) {
    for (int c = 0; c < C; c++) {
        const float *hc = h + (long)c * N, *gc = g + (long)c * N;
        float *dhc = dh + (long)c * N;
        float sg = 0.0f;
#pragma omp simd reduction(+:sg)
        for (int n = 0; n < N; n++) { dhc[n] = 0.0f; sg += gc[n]; }
        db2[c] = sg;
        for (int k = 0; k < H; k++) {
            const float a = w1[c * H + k], b = b1[c * H + k], w = w2[c * H + k];
            float s_w1 = 0.0f, s_b1 = 0.0f, s_w2 = 0.0f;
#pragma omp simd reduction(+:s_w1, s_b1, s_w2)
            for (int n = 0; n < N; n++) {
                float p = hc[n] * a + b;
                float cdf = 0.5f + 0.5f * erf_(p * SQRT1_2);
                float pdf = INV_SQRT_2PI * exp_neg(-0.5f * p * p);
                float dpre = gc[n] * w * (cdf + p * pdf);
                dhc[n] += dpre * a;
                s_w1 += dpre * hc[n];
                s_b1 += dpre;
                s_w2 += gc[n] * p * cdf;
            }
            dw1[c * H + k] = s_w1;
            db1[c * H + k] = s_b1;
            dw2[c * H + k] = s_w2;
        }
    }
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
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.ci_forward.argtypes = [ptr, i32, i32, i32, ptr, ptr, ptr, ptr, ptr]
    lib.ci_backward.argtypes = [ptr, ptr, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    return lib


def _use_ci_kernel(*tensors: Tensor) -> bool:
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and tensors[0].shape[0] < 2 ** 31 and _ci_kernel() is not None)


class ScalarGeluMLP(torch.autograd.Function):
    """C independent MLPs 1 -> H (GELU) -> 1, one per column of h (N, C) -> (N, C). Weights w1, b1,
    w2 as (C, H), b2 as (C,): views of the stored parameters. The C kernel above on CPU; else the
    (N, C, H) hidden layer is one broadcast addcmul, and the backward reuses the forward's
    pre-activations and activations instead of autograd's per-op backward."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        w1, b1, w2, b2 = (t.contiguous() for t in (w1, b1, w2, b2))
        ctx.kernel = _use_ci_kernel(h, w1, b1, w2, b2)
        if ctx.kernel:
            (C, N), H = h.T.shape, w1.shape[1]
            hT = h.T.contiguous()  # (C, N): the kernel runs along N, contiguous for SIMD
            out = h.new_empty(C, N)  # new_empty: on h's device (cpu) whatever torch's default device is
            _ci_kernel().ci_forward(hT.data_ptr(), C, N, H, w1.data_ptr(), b1.data_ptr(), w2.data_ptr(),
                                    b2.data_ptr(), out.data_ptr())
            ctx.save_for_backward(hT, w1, b1, w2)
            return out.T.contiguous()
        pre = torch.addcmul(b1, h.unsqueeze(-1), w1)  # (N, C, H)
        act = F.gelu(pre)
        ctx.save_for_backward(h, w1, w2, pre, act)
        return (act * w2).sum(-1).add_(b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, ...]:
        if ctx.kernel:
            hT, w1, b1, w2 = ctx.saved_tensors
            (C, N), H = hT.shape, w1.shape[1]
            gT = g.T.contiguous().float()
            dh, dw1, db1, dw2, db2 = (hT.new_empty(C, N), w1.new_empty(C, H), w1.new_empty(C, H),
                                      w1.new_empty(C, H), w1.new_empty(C))
            _ci_kernel().ci_backward(hT.data_ptr(), gT.data_ptr(), C, N, H, w1.data_ptr(), b1.data_ptr(),
                                     w2.data_ptr(), dh.data_ptr(), dw1.data_ptr(), db1.data_ptr(), dw2.data_ptr(),
                                     db2.data_ptr())
            return dh.T, dw1, db1, dw2, db2
        h, w1, w2, pre, act = ctx.saved_tensors
        g3 = g.unsqueeze(-1)
        dpre = torch.ops.aten.gelu_backward(g3 * w2, pre)  # (N, C, H)
        return (dpre * w1).sum(-1), (dpre * h.unsqueeze(-1)).sum(0), dpre.sum(0), (act * g3).sum(0), g.sum(0)
