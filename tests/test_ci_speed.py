"""The fast scalar CI MLPs (C kernel on CPU, broadcast torch ops elsewhere) against a plain reference."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import spd_ci
import spd_common
import spd_kernels
from spd_ci import ScalarMLPs


def reference(h, layers):
    """One MLP per subcomponent, looped: h (..., C) -> (..., C)."""
    ws, bs = layers[0::2], layers[1::2]
    outs = []
    for c in range(h.shape[-1]):
        x = h[..., c:c + 1]
        for i, (w, b) in enumerate(zip(ws, bs)):
            x = x @ w[c] + b[c, 0]
            if i < len(ws) - 1:
                x = F.gelu(x)
        outs.append(x[..., 0])
    return torch.stack(outs, -1)


def values_and_grads(fn, h, layers, g):
    h = h.detach().requires_grad_()
    out = fn(h)
    return [out, *torch.autograd.grad(out, [h, *layers], g)]


def check(fn, hidden, dtype, scale=2.0, rtol=1e-6, shape=(3, 300)):
    torch.manual_seed(0)
    C = 7
    fn = fn.to(dtype) if fn is not None else ScalarMLPs(C, hidden).to(dtype)
    layers = list(fn.layers)
    h = torch.randn(*shape, C, dtype=dtype) * scale
    g = torch.randn(*shape, C, dtype=dtype)
    ref = values_and_grads(lambda x: reference(x, [p.double() for p in layers]), h.double(), layers, g.double())
    got = values_and_grads(fn, h, layers, g)
    for name, r, x in zip(["out", "dh", "dw1", "db1", "dw2", "db2", "dw3", "db3"], ref, got):
        assert x.dtype == dtype and x.shape == r.shape
        err = (x.double() - r).abs().max().item() / max(r.abs().max().item(), 1.0)
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("hidden", [[16], [5], [8, 4]])
def test_scalar_mlps_match_reference(monkeypatch, use_kernel, hidden):
    if use_kernel and spd_kernels._ci_kernel() is None:
        pytest.skip("no C compiler: the kernel path is not used here")
    if not use_kernel:
        monkeypatch.setattr(spd_ci, "use_ci_kernel", lambda *t: False)
    check(None, hidden, torch.float64, rtol=1e-12)  # float64 never takes the kernel
    check(None, hidden, torch.float32, rtol=1e-6)


def test_kernel_extreme_inputs():
    """Large |pre-activations| (erf clamped at +-4, exp underflowing) and exact zeros."""
    if spd_kernels._ci_kernel() is None:
        pytest.skip("no C compiler")
    check(None, [16], torch.float32, scale=30.0, rtol=1e-6)
    fn = ScalarMLPs(7, [16])
    with torch.no_grad():
        fn.layers[1].zero_()
    h = torch.zeros(4, 7)
    h[1] = 1e4
    h[2] = -1e4
    ref = reference(h.double(), [p.double() for p in fn.layers])
    float32_err = (reference(h, list(fn.layers)).double() - ref).abs()  # the sum of terms ~1e4 cancels
    assert torch.all((fn(h).double() - ref).abs() <= 4 * float32_err + 1e-6 * ref.abs().clamp(min=1))


def test_kernel_and_torch_paths_agree(monkeypatch):
    """Same parameters, same inputs: both implementations to float32 rounding, also without grad."""
    if spd_kernels._ci_kernel() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(1)
    fn = ScalarMLPs(20, [16])
    h = torch.randn(4096, 20)
    with torch.no_grad():
        fast = fn(h)
    monkeypatch.setattr(spd_ci, "use_ci_kernel", lambda *t: False)
    # Each output sums 16 terms: the paths' rounding differs by a few ulps of the largest output (~12
    # here), and by how much depends on the CPU's vector units (1e-6 absolute failed on one machine).
    atol = 8 * torch.finfo(torch.float32).eps * fast.abs().max().item()
    with torch.no_grad():
        torch.testing.assert_close(fn(h), fast, rtol=0, atol=atol)


@pytest.mark.parametrize("sigmoid", ["leaky_forward", "clamp_forward_leaky_backward"])
def test_kernel_sigmoids_match_torch(sigmoid):
    """The kernel's fused sigmoids: (lower, upper) and the gradients from both (plus the pre-activations')
    equal the CI function in torch followed by hard_sigmoids, to float32 rounding. Large inputs put
    pre-activations on every piece (below 0, [0, 1], above 1), and the gradients have both signs."""
    if spd_kernels._ci_kernel() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(2)
    fn = ScalarMLPs(20, [16])
    h = (torch.randn(1000, 20) * 3).requires_grad_()
    g_lo, g_up, g_pre = torch.randn(3, 1000, 20)
    ref_pre = reference(h.double(), [p.double() for p in fn.layers])
    ref = [ref_pre, *spd_ci.hard_sigmoids(ref_pre, sigmoid)]
    fused = fn.fused(h, sigmoid)
    assert fused is not None
    assert (ref_pre < 0).any() and (ref_pre > 1).any()
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    params = [h, *fn.layers]
    grads = torch.autograd.grad(sum((o * g).sum() for o, g in zip(fused, [g_pre, g_lo, g_up])), params)
    ref_grads = torch.autograd.grad(sum((o * g.double()).sum() for o, g in zip(ref, [g_pre, g_lo, g_up])), params,
                                    retain_graph=True)
    for got, want in zip(grads, ref_grads):
        err = (got.double() - want).abs().max() / want.abs().max().clamp(min=1)
        assert err < 1e-5
    lower, upper = fn.ci(h, sigmoid)  # what ComponentModel uses: no gradient into pre, over several tiles of rows
    assert torch.equal(lower, fused[1]) and torch.equal(upper, fused[2])
    grads = torch.autograd.grad((lower * g_lo).sum() + (upper * g_up).sum(), params)
    ref_grads = torch.autograd.grad((ref[1] * g_lo.double()).sum() + (ref[2] * g_up.double()).sum(), params)
    for got, want in zip(grads, ref_grads):
        assert (got.double() - want).abs().max() / want.abs().max().clamp(min=1) < 1e-5


def test_masks_lerp_matches_formula():
    torch.manual_seed(0)
    g = torch.rand(500, 7, requires_grad=True)
    torch.manual_seed(1)
    masks, deltas = spd_common.sample_masks({"a": g}, "continuous", use_delta=True)
    torch.manual_seed(1)
    r = spd_common.global_uniform(g.shape, g)
    torch.testing.assert_close(masks["a"], g + (1 - g) * r, rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(masks["a"].sum(), g)
    torch.testing.assert_close(grad, 1 - r, rtol=0, atol=1e-6)


@pytest.mark.skipif(not spd_kernels.use_ci_kernel(torch.zeros(1)), reason="no C compiler here")
def test_counter_noise_is_uniform_and_shards_like_one_draw():
    """The kernel's noise: each rank's rows are the global draw's, it is deterministic in the generator's
    state, and it looks like U[0, 1): moments, a Kolmogorov-Smirnov test and no correlation between
    neighbouring elements or the two halves of a (batch, C) draw."""
    from scipy import stats

    from spd_run import Dist

    def draw(shape, rank=0, world=1, seed=3):
        return spd_common.global_uniform(torch.Size(shape), torch.zeros(1), Dist(rank, world),
                                         torch.Generator().manual_seed(seed))

    full = draw((4096, 20))
    assert torch.equal(torch.cat([draw((1024, 20), r, 4) for r in range(4)]), full)
    assert torch.equal(draw((4096, 20)), full) and not torch.equal(draw((4096, 20), seed=4), full)
    x = full.double().flatten()
    assert 0 <= x.min() and x.max() < 1
    assert abs(x.mean() - 0.5) < 0.005 and abs(x.var() - 1 / 12) < 0.002
    assert stats.kstest(x.numpy(), "uniform").pvalue > 1e-3
    for a, b in ((x[:-1], x[1:]), (full[:, :10].flatten(), full[:, 10:].flatten())):
        assert abs(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1]) < 0.01


@pytest.mark.skipif(not spd_kernels.use_ci_kernel(torch.zeros(1)), reason="no C compiler here")
def test_torch_noise_is_the_kernels_bit_for_bit(monkeypatch):
    """Without the kernel (no C compiler, or a GPU) the noise is the same hash in torch ops: the same
    numbers, offsets (a rank's rows) included."""
    def draw(offset):
        return spd_kernels.counter_uniform(torch.Size((333, 7)), offset, torch.Generator().manual_seed(5))

    kernel = [draw(0), draw(2 ** 32 - 100)]  # the second wraps the 32-bit counter, as the kernel's does
    monkeypatch.setattr(spd_kernels, "_ci_kernel", lambda: None)
    for want, got in zip(kernel, [draw(0), draw(2 ** 32 - 100)]):
        assert torch.equal(got, want)


@pytest.mark.skipif(not spd_kernels.use_ci_kernel(torch.zeros(1)), reason="no C compiler here")
def test_tms_trains_the_same_with_and_without_the_kernel(tmp_path):
    """20 TMS steps with the C kernel and 20 with it disabled (SPD_CI_KERNEL=0, as on a machine without
    gcc): the same mask noise, so the same losses, to the float rounding of the CI function's two paths."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    losses = []
    for kernel in ("1", "0"):
        out = tmp_path / f"kernel{kernel}"
        args = ["spd.steps=20", "spd.log_every=1", "spd.eval_every=100", "spd.faithfulness_warmup_steps=5",
                "target.steps=200", f"target.path={tmp_path / 'target.pt'}", "target.min_column_norm=0",
                "spd.threads=1", "--out", str(out)]
        proc = subprocess.run([sys.executable, str(root / "tms_decomposition.py"), str(root / "configs/tms_5-2.yaml"),
                               *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env=os.environ | {"SPD_CI_KERNEL": kernel})
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses.append(torch.tensor([r["train/total"] for r in rows if "train/total" in r]))
    assert len(losses[0]) == 20
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_matches_the_formula_and_keeps_one_logits_tensor(monkeypatch, dtype):
    """KLDivLogits against sum_v p (log p - log q) written out with autograd: value and gradient, over
    several chunks of positions (one ragged); for backward it keeps one (positions, V) tensor, not two."""
    from spd_kernels import KLDivLogits

    monkeypatch.setattr(KLDivLogits, "CHUNK", 4)
    g = torch.Generator().manual_seed(0)
    pred = (3 * torch.randn(2, 5, 11, generator=g)).to(dtype).requires_grad_()
    target = (3 * torch.randn(2, 5, 11, generator=g)).to(dtype)
    p, logq = torch.softmax(target.double(), -1), torch.log_softmax(pred.double(), -1)
    expected = (p * (p.log() - logq)).sum(-1).mean()
    (expected_grad,) = torch.autograd.grad(expected, pred)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = KLDivLogits.apply(pred, target)
    loss.backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert loss.item() == pytest.approx(expected.item(), rel=tol, abs=tol)
    torch.testing.assert_close(pred.grad.double(), expected_grad.double(), atol=tol / 10, rtol=tol)
    assert saved == [pred.numel()]

    saved.clear()  # what autograd keeps for the same formula in torch ops: two logits-sized tensors
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logp, logq = torch.log_softmax(target, -1), torch.log_softmax(pred, -1)
        (logp.exp() * (logp - logq)).sum(-1).mean()
    assert sum(saved) == 2 * pred.numel()
