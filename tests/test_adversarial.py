"""Adversarial (PGD) masks and their source scopes, persistent PGD, subset routing per position, the
importance-frequency term and the global CI functions: each against the reference's definition."""

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from spd_common import (PGD, ComponentModel, PersistentAdversary, SPDConfig, StepBatch, draw_rows, evaluate,
                        importance_frequency_loss, importance_minimality_loss, masked_recon_loss,
                        masks_from_sources, optimize, persistent_pgd_lr, pgd_recon_loss, pgd_sources, subset_rows,
                        train_step, training_losses)
from spd_ci import CITransformer
from spd_config import SPDError
from spd_run import Dist, average_gradients
from test_spd_common import TinyNet, make_model

IDENTITY = lambda out: out  # noqa: E731


def batch_and_ci(model, x):
    """The step context of input x (MSE against the target's output) and the CI on it."""
    b = StepBatch.of(model, x, IDENTITY, "mse")
    return b, model.causal_importances(b.inputs)[0]


def scalar_model():
    """y = W x with W = 1, decomposed as U V = 2 * 1 (so W - UV = -1)."""
    target = nn.Sequential(nn.Linear(1, 1, bias=False))
    model = ComponentModel(target, {"0": 1}, {}, "mlp", [4])
    with torch.no_grad():
        target[0].original.weight.fill_(1.0)
        model.decomposed["0"].components.U.fill_(2.0)
        model.decomposed["0"].components.V.fill_(1.0)
    return model


def test_pgd_masks_stay_within_ci_and_one():
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    b, ci = batch_and_ci(model, tokens)
    sources = pgd_sources(b, ci, PGD(5, 0.7), use_delta=True)
    masks, deltas = masks_from_sources(ci, sources)
    for n, g in ci.items():
        assert torch.all(masks[n] >= g - 1e-7) and torch.all(masks[n] <= 1)
        assert torch.all((deltas[n] >= 0) & (deltas[n] <= 1))
    assert any(torch.any((s > 0) & (s < 1)) or torch.any(s == 1) for s in sources.values())  # it moved


@pytest.mark.parametrize("scope, mask_source, delta_source", [("shared_across_batch", (1, 1, 5), (1, 1)),
                                                               ("per_example", (6, 1, 5), (6, 1)),
                                                               ("per_position", (6, 3, 5), (6, 3))])
def test_pgd_source_scopes(scope, mask_source, delta_source):
    """The reference's scopes: one source per component for the whole batch, per example (sequence), or per
    position, broadcast over the rest; m = g + (1 - g) s everywhere, and the delta mask is s itself."""
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    b, ci = batch_and_ci(model, tokens)
    sources = pgd_sources(b, ci, PGD(3, 0.1, source_scope=scope), use_delta=True)
    assert sources["mask/fc1"].shape == mask_source and sources["delta/fc1"].shape == delta_source
    masks, deltas = masks_from_sources(ci, sources)
    s = sources["mask/fc1"].expand(6, 3, 5)
    torch.testing.assert_close(masks["fc1"], ci["fc1"] + (1 - ci["fc1"]) * s)
    torch.testing.assert_close(deltas["fc1"], sources["delta/fc1"].expand(6, 3))


def test_shared_source_ascends_the_batch_mean_gradient():
    """A shared source moves by the sign of the whole batch's gradient: one step from s = 0 by hand on
    y = (2 m - d) x against x (W = 1, U V = 2): the residual 2 m - d - 1 is +0.6 on one example and -0.8
    on the other (g = 0.8 and 0.1), so the batch-mean loss grows with m where r^2 grows fastest."""
    model = scalar_model()
    x = torch.ones(2, 1)
    ci = {"0": torch.tensor([[0.8], [0.1]])}
    b = StepBatch.of(model, x, IDENTITY, "mse")
    shared = pgd_sources(b, ci, PGD(1, 0.1, "ci", "shared_across_batch"), use_delta=True)
    # dL/ds = mean_b 2 r_b * 2 (1 - g_b) = (2 * 0.6 * 2 * 0.2 + 2 * -0.8 * 2 * 0.9) / 2 < 0: s stays at 0
    assert shared["mask/0"].item() == 0.0
    # dL/dd = mean_b 2 r_b * -1 = -(0.6 - 0.8) > 0: d rises by the step
    assert shared["delta/0"].item() == pytest.approx(0.1)
    per_example = pgd_sources(b, ci, PGD(1, 0.1, "ci", "per_position"), use_delta=True)
    assert per_example["mask/0"].flatten().tolist() == pytest.approx([0.1, 0.0])


def test_pgd_with_no_steps_from_ci_is_the_ci_masked_loss():
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    b, ci = batch_and_ci(model, tokens)
    cfg = SPDConfig(pgd_steps=0, pgd_init="ci", use_delta_component=True)
    ci_masked = masked_recon_loss(model, tokens, b.target_out, ci, None, "mse", IDENTITY)
    torch.testing.assert_close(pgd_recon_loss(b, ci, cfg), ci_masked)


def test_one_pgd_step_by_hand():
    """y = W x with W = 1 decomposed as U V = 2 * 1, so W - UV = -1. Masks m = g + (1 - g) s and delta
    mask d give y = (2 m - d) x; against the target x, the loss is (2 m - d - 1)^2 x^2. From CI init
    (s = 0, d = 0) at g = 0.8 and x = 1: r = 2 m - d - 1 = 0.6 > 0, so the ascent raises s (dL/dm > 0)
    and would lower d (dL/dd < 0, clamped at 0): s = 0.1, d = 0, m = 0.82, loss = 0.64^2. At g = 0.5
    the residual is 0: a zero gradient, no step."""
    model = scalar_model()
    x = torch.ones(1, 1)
    cfg = SPDConfig(pgd_step_size=0.1, pgd_init="ci", use_delta_component=True, pgd_steps=1)
    ci = {"0": torch.tensor([[0.8]])}
    b = StepBatch.of(model, x, IDENTITY, "mse")  # the target's output is x
    sources = pgd_sources(b, ci, PGD.training(cfg), use_delta=True)
    assert sources["mask/0"].item() == pytest.approx(0.1) and sources["delta/0"].item() == 0.0
    assert pgd_recon_loss(b, ci, cfg).item() == pytest.approx(0.64 ** 2)
    sources = pgd_sources(b, {"0": torch.tensor([[0.5]])}, PGD.training(cfg), use_delta=True)
    assert sources["mask/0"].item() == 0.0


def test_pgd_trains_components_and_ci_but_not_through_the_ascent():
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    b, ci = batch_and_ci(model, tokens)
    for cfg in (SPDConfig(pgd_steps=2), SPDConfig(pgd_steps=2, pgd_routing="uniform_k_subset",
                                                  pgd_source_scope="shared_across_batch")):
        loss = pgd_recon_loss(b, ci, cfg)
        grads = torch.autograd.grad(loss, [*model.components.parameters(), *model.ci_fns.parameters()],
                                    allow_unused=True, retain_graph=True)
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads[len(list(model.components.parameters())):])  # into the CI fns


def test_subset_routing_with_all_modules_equals_masking_all():
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    target_out, _ = model.run_target(tokens)
    masks = {n: torch.rand(6, 3, 5) for n in model.names}
    deltas = {n: torch.rand(6, 3) for n in model.names}
    for k in (torch.full((6, 1), len(masks)), torch.full((6, 3, 1), len(masks))):  # per example, per position
        rows = subset_rows(masks, k)
        assert all(r.all() for r in rows.values())
        everything = masked_recon_loss(model, tokens, target_out, masks, deltas, "mse", IDENTITY)
        routed = masked_recon_loss(model, tokens, target_out, masks, deltas, "mse", IDENTITY, rows=rows)
        torch.testing.assert_close(routed, everything)
    rows = subset_rows(masks, torch.tensor([[1], [2], [3], [1], [2], [3]]))
    assert torch.stack(list(rows.values()), 1).sum(1).tolist() == [1, 2, 3, 1, 2, 3]


def test_subset_routing_is_drawn_per_position():
    """The reference draws k ~ U{1..M} and a k-subset at every (batch, seq) position: one sequence mixes
    masked and unmasked modules across its tokens, so the fraction of masked positions varies within a
    sequence's modules and across the batch. Per example (the option), it is constant along a sequence.
    The routed forward at each position equals masking exactly that position's modules."""
    torch.manual_seed(0)
    model = make_model()
    tokens = torch.randint(0, 7, (8, 16))
    _, ci = batch_and_ci(model, tokens)
    rows = draw_rows(ci, "uniform_k_subset", "position")
    chosen = torch.stack([rows[n] for n in model.names], -1)  # (8, 16, M)
    assert chosen.shape == (8, 16, 3) and chosen.sum(-1).min() >= 1
    per_sequence = chosen.float().mean(1)  # (8, M): fraction of each sequence's tokens masking each module
    assert ((per_sequence > 0) & (per_sequence < 1)).any()  # a module masked on some tokens of a sequence only
    assert per_sequence[:, 0].unique().numel() > 1  # and the fraction differs between sequences
    by_example = torch.stack(list(draw_rows(ci, "uniform_k_subset", "example").values()), -1)
    assert by_example.shape == (8, 3)
    masks = {n: torch.rand_like(g) for n, g in ci.items()}
    with torch.no_grad(), model.masked(masks, rows=rows):
        routed = model(tokens)
    for b, t in [(0, 0), (3, 7), (7, 15)]:
        names = [n for n in model.names if rows[n][b, t]]
        with torch.no_grad(), model.masked({n: masks[n] for n in names}):
            torch.testing.assert_close(routed[b, t], model(tokens)[b, t])


def test_importance_frequency_is_the_references():
    """`../shared/anchors.md`'s case: 1000 inputs, CI exactly 0 or 1, p = 1. The reference's frequency part,
    sum_c mean_c log2(1 + sum_c), is log2(1001) = 9.97 for one subcomponent on every input and
    2 * 0.5 * log2(501) = 8.97 for two on half the inputs each: splitting is cheaper. (The former term,
    mean_c log2(1 + sum_c), gave 4.98 and 8.97: it rewarded concentrating.)"""
    one = torch.zeros(1000, 2)
    one[:, 0] = 1
    halves = torch.zeros(1000, 2)
    halves[:500, 0] = 1
    halves[500:, 1] = 1
    assert importance_frequency_loss({"m": one}, p=1.0).item() == pytest.approx(math.log2(1001), rel=1e-5)
    assert importance_frequency_loss({"m": halves}, p=1.0).item() == pytest.approx(math.log2(501), rel=1e-5)
    # Per module, over its own positions (a sequence module's batch x seq), summed over modules, on (g + eps)^p
    g = torch.rand(4, 5, 3)
    a = g ** 2.0
    s = a.sum((0, 1))
    expected = (s / 20 * torch.log2(1 + s)).sum() + math.log2(1001)
    got = importance_frequency_loss({"seq": g, "m": one}, p=2.0)
    torch.testing.assert_close(got, expected)
    # With beta the whole term is the reference's sum_c [mean_c + beta mean_c log2(1 + sum_c)] times beta3
    cfg = SPDConfig(importance_minimality_coeff=1e-3, importance_minimality_beta=0.5, stochastic_recon_coeff=None,
                    stochastic_recon_layerwise_coeff=None)
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    losses = training_losses(model, cfg, tokens, 0.0, IDENTITY)
    _, ci_upper = model.causal_importances(model.run_target(tokens)[1])
    reference = 0.0
    for u in ci_upper.values():
        a = (u + 1e-12).flatten(0, -2)
        mean_c, sum_c = a.mean(0), a.sum(0)
        reference = reference + (mean_c + 0.5 * mean_c * torch.log2(1 + sum_c)).sum()
    torch.testing.assert_close(losses["total"], 1e-3 * reference)
    torch.testing.assert_close(losses["importance_minimality"], importance_minimality_loss(ci_upper, 1.0))


def test_persistent_adam_is_param_decomps():
    """Adam with betas (0.5, 0.99), bias-corrected, ascending and clamped to [0, 1], by hand over two steps."""
    adversary = PersistentAdversary({})
    pgd = PGD(1, 0.1, source_scope="shared_across_batch")
    ci = {"m": torch.zeros(4, 2)}
    torch.manual_seed(0)
    sources = adversary.local_sources(ci, pgd, use_delta=False, ddp=Dist())
    s0 = sources["mask/m"].clone()
    g1, g2 = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.5]])
    adversary.ascend({"mask/m": g1}, pgd, 0.1, Dist())
    adversary.ascend({"mask/m": g2}, pgd, 0.05, Dist())
    m1, v1 = 0.5 * g1, 0.01 * g1 ** 2
    m2, v2 = 0.5 * m1 + 0.5 * g2, 0.99 * v1 + 0.01 * g2 ** 2
    s1 = (s0 + 0.1 * (m1 / 0.5) / ((v1 / 0.01).sqrt() + 1e-8)).clamp(0, 1)
    s2 = (s1 + 0.05 * (m2 / 0.75) / ((v2 / (1 - 0.99 ** 2)).sqrt() + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(adversary.state["source/mask/m"], s2)
    assert adversary.state["t"].item() == 2


def test_persistent_pgd_lr_warms_up_then_falls_by_cosine():
    cfg = SPDConfig(pgd_step_size=1.0, steps=100, pgd_lr_warmup_frac=0.1, pgd_lr_final_frac=0.1)
    assert persistent_pgd_lr(cfg, 0) == pytest.approx(0.1)
    assert persistent_pgd_lr(cfg, 9) == pytest.approx(1.0)
    assert persistent_pgd_lr(cfg, 10) == pytest.approx(1.0)
    assert persistent_pgd_lr(cfg, 55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert persistent_pgd_lr(cfg, 100) == pytest.approx(0.1)


def test_persistent_pgd_ascends_after_backward_and_not_on_a_skipped_step():
    """Per training step: pgd_steps warm-up ascents before the loss, one after the backward pass from the
    training gradient (t = 3 after one step with pgd_steps = 2); a step skipped for a nan leaves the
    adversary exactly as it was."""
    model = make_model()
    cfg = SPDConfig(pgd_recon_coeff=1.0, pgd_persistent=True, pgd_steps=2, steps=4, on_nan="skip")
    params = [*model.components.parameters(), *model.ci_fns.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    tokens = torch.randint(0, 7, (6, 3))
    adversary = PersistentAdversary({})
    _, bad = train_step(model, cfg, opt, tokens, 0, IDENTITY, Dist(), adversary)
    assert bad is None and adversary.state["t"].item() == 3
    after_first = {k: v.clone() for k, v in adversary.state.items()}
    _, bad = train_step(model, cfg, opt, tokens, 1, lambda out: out * float("nan"), Dist(), adversary)
    assert bad is not None
    for k, v in after_first.items():
        assert torch.equal(adversary.state[k], v), k


def test_evaluation_adversary_is_the_references():
    """recon/pgd_shared_20: a fresh adversary of 20 steps of 0.1 from uniform sources, shared across the batch."""
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    metrics = evaluate(model, SPDConfig(), tokens, IDENTITY, torch.Generator().manual_seed(0))
    assert "recon/pgd_shared_20" in metrics and metrics["recon/pgd_shared_20"] >= metrics["recon/ci_masked"]
    per_position = evaluate(model, SPDConfig(pgd_eval_steps=3, pgd_eval_source_scope="per_position"), tokens, IDENTITY)
    assert "recon/pgd_per_position_3" in per_position


CONFIGS = {  # the options each get the 2-process == 1-process check
    "pgd": dict(pgd_recon_coeff=1.0, pgd_steps=2, stochastic_recon_routing="uniform_k_subset"),
    "pgd_subset_shared": dict(pgd_recon_coeff=1.0, pgd_steps=2, pgd_routing="uniform_k_subset",
                              pgd_source_scope="shared_across_batch", importance_minimality_beta=0.5),
    "persistent": dict(pgd_recon_coeff=1.0, pgd_steps=2, pgd_persistent=True, importance_minimality_beta=0.5),
    "persistent_shared": dict(pgd_recon_coeff=1.0, pgd_steps=1, pgd_persistent=True,
                              pgd_source_scope="shared_across_batch", routing_unit="example",
                              stochastic_recon_routing="uniform_k_subset"),
}


def gradients(rank, world_size, port, out):
    """Gradients of two training steps' total loss for each of CONFIGS on rank `rank`'s shard of a fixed
    global batch, averaged over ranks as `train_step` does, the persistent adversary's ascent after
    backward included."""
    ddp = Dist(rank, world_size)
    if world_size > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world_size)
    torch.set_num_threads(1)
    results = {}
    for name, options in CONFIGS.items():
        model = make_model()
        cfg = SPDConfig(**options)
        adversary = PersistentAdversary({}) if cfg.pgd_persistent else None
        tokens = torch.randint(0, 7, (8, 3), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        for step in range(2):  # the second step starts from the persistent adversary's state
            model.zero_grad()
            losses = training_losses(model, cfg, ddp.shard(tokens), 0.5, IDENTITY, ddp, adversary)
            losses["total"].backward()
            params = [*model.components.parameters(), *model.ci_fns.parameters()]
            average_gradients(params, ddp)
            if adversary is not None:
                adversary.ascend_from_training_gradient(cfg, step, ddp)
        results[name] = [p.grad.clone() for p in params]
        results[f"{name}/losses"] = [ddp.mean(v.detach()) for v in losses.values()]
        if adversary is not None:
            results[f"{name}/adversary"] = list(adversary.state.values())
    if rank == 0:
        torch.save(results, out)
    if world_size > 1:
        torch.distributed.destroy_process_group()


def test_pgd_and_frequency_term_gradients_on_two_processes_equal_one(tmp_path):
    gradients(0, 1, 0, tmp_path / "one.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(gradients, args=(2, port, tmp_path / "two.pt"), nprocs=2)
    one, two = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in ("one", "two"))
    assert set(one) == set(two)
    for key in one:
        for a, b in zip(one[key], two[key]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=str(key))


@pytest.mark.parametrize("scope", ["per_position", "shared_across_batch"])
def test_persistent_pgd_resumes_bit_identical(tmp_path, scope):
    """Interrupted after the step-3 checkpoint and resumed, a run with persistent PGD ends in exactly the
    state of an uninterrupted one, adversary included."""
    cfg = SPDConfig(pgd_recon_coeff=1.0, pgd_persistent=True, pgd_steps=2, steps=6, batch_size=8, eval_batch_size=8,
                    checkpoint_every=3, eval_every=100, pgd_eval_steps=2, pgd_source_scope=scope,
                    pgd_routing="uniform_k_subset")
    batch = lambda step: torch.randint(0, 7, (8, 3), generator=torch.Generator().manual_seed(step))  # noqa: E731

    def stop_at_4(step):
        if step == 4:
            raise KeyboardInterrupt
        return batch(step)

    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()
    whole = make_model()
    optimize(whole, cfg, batch, batch, tmp_path / "whole", full_config={})
    with pytest.raises(KeyboardInterrupt):
        optimize(make_model(), cfg, stop_at_4, batch, tmp_path / "resumed", full_config={})
    saved = torch.load(tmp_path / "resumed/checkpoints/step_3.pt", weights_only=True)["adversary"]
    assert saved["t"].item() == 3 * (cfg.pgd_steps + 1)
    assert saved["source/mask/fc1"].shape == ((8, 3, 5) if scope == "per_position" else (1, 1, 5))
    resumed = make_model()
    optimize(resumed, cfg, batch, batch, tmp_path / "resumed", full_config={})
    for a, b in zip(whole.decomposition_state().items(), resumed.decomposition_state().items()):
        for k in a[1]:
            assert torch.equal(a[1][k], b[1][k]), (a[0], k)
    adversaries = [torch.load(tmp_path / f"{r}/checkpoints/final.pt", weights_only=True)["adversary"]
                   for r in ("whole", "resumed")]
    assert adversaries[0]["t"].item() == 6 * (cfg.pgd_steps + 1)
    for k, v in adversaries[0].items():
        assert torch.equal(adversaries[1][k], v), k


@pytest.mark.parametrize("kind", ["global_shared_mlp", "global_transformer"])
def test_global_ci_function_reads_all_modules_and_trains(kind):
    """One network gives every module's CI, and training reaches it; it has no per-module CI."""
    torch.manual_seed(0)
    model = ComponentModel(TinyNet(), {"emb": 5, "fc*": 4}, {}, kind, [8])
    assert list(model.ci_fns) == ["global"]
    tokens = torch.randint(0, 7, (6, 3))
    ci = model.ci_of(tokens)
    assert {n: tuple(g.shape) for n, g in ci.items()} == {"emb": (6, 3, 5), "fc1": (6, 3, 4), "fc2": (6, 3, 4)}
    cfg = SPDConfig(ci_fn=kind, ci_hidden=[8])
    loss = training_losses(model, cfg, tokens, 0.5, IDENTITY)["total"]
    grads = torch.autograd.grad(loss, list(model.ci_fns.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    with pytest.raises(Exception, match="reads every module's input at once"):
        model.module_ci("fc1", torch.zeros(2, 4))


def reference_global_transformer(net: CITransformer, a: torch.Tensor, positions: bool = True,
                                 causal: bool = False) -> torch.Tensor:
    """The reference's global CI transformer, written out position by position from `net`'s weights:
    a (batch, seq, d_in) -> (batch, seq, d_out). `positions=False`: the same network without RoPE."""
    def rms(x):  # no learnable scale
        return x / torch.sqrt((x * x).mean() + torch.finfo(x.dtype).eps)

    def gelu(x):  # exact (erf) GELU
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    def rotation(t, d_head):
        """RoPE at position t: pair (i, i + d_head/2) turned by t * 10000^(-2i / d_head)."""
        R, half = torch.eye(d_head, dtype=torch.float64), d_head // 2
        for i in range(half):
            theta = t * 10000.0 ** (-2 * i / d_head) if positions else 0.0
            c, s = math.cos(theta), math.sin(theta)
            R[i, i], R[i, i + half], R[i + half, i], R[i + half, i + half] = c, -s, s, c
        return R

    B, T, _ = a.shape
    out = torch.zeros(B, T, net.proj_out.out_features, dtype=torch.float64)
    for b in range(B):
        xs = [net.proj_in.weight @ a[b, t] + net.proj_in.bias for t in range(T)]
        for block in net.blocks:
            d = xs[0].shape[0]
            H = block.heads
            dh = d // H
            Wq, Wk, Wv = block.qkv.weight.split(d)
            hs = [rms(x) for x in xs]
            attn = []
            for s in range(T):
                heads = []
                for h in range(H):
                    rows = slice(h * dh, (h + 1) * dh)
                    q = rotation(s, dh) @ (Wq[rows] @ hs[s])
                    seen = range(s + 1) if causal else range(T)  # the reference attends to every position
                    scores = torch.stack([q @ (rotation(t, dh) @ (Wk[rows] @ hs[t])) / math.sqrt(dh) for t in seen])
                    p = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
                    heads.append(sum(p[j] * (Wv[rows] @ hs[t]) for j, t in enumerate(seen)))
                attn.append(block.attn_out.weight @ torch.cat(heads))
            xs = [x + o for x, o in zip(xs, attn)]
            up, down = block.mlp[0], block.mlp[2]
            xs = [x + down.weight @ gelu(up.weight @ rms(x) + up.bias) + down.bias for x in xs]
        for t in range(T):
            out[b, t] = net.proj_out.weight @ xs[t] + net.proj_out.bias
    return out


def test_global_transformer_equals_the_reference_by_hand():
    """One block, two heads of width 4: the module computes the reference's RMSNorm -> bidirectional
    RoPE attention -> residual -> RMSNorm -> GELU MLP -> residual, then the output projection."""
    torch.manual_seed(0)
    net = CITransformer(d_in=5, d_out=3, d_model=8, layers=1, heads=2).double()
    a = torch.randn(2, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(a), reference_global_transformer(net, a), atol=1e-5, rtol=1e-5)
        causal = CITransformer(d_in=5, d_out=3, d_model=8, layers=2, heads=2, causal=True).double()
        torch.testing.assert_close(causal(a), reference_global_transformer(causal, a, causal=True),
                                   atol=1e-5, rtol=1e-5)


def test_global_transformer_is_bidirectional_unless_causal():
    """Changing the last position changes the earlier positions' CI (the reference attends both ways);
    with causal=True it does not."""
    torch.manual_seed(0)
    a = torch.randn(3, 5, 6)
    later_changed = a.clone()
    later_changed[:, -1] = torch.randn(3, 6)
    for causal in (False, True):
        net = CITransformer(6, 4, 8, layers=2, heads=2, causal=causal)
        with torch.no_grad():
            earlier, earlier_changed = net(a)[:, :-1], net(later_changed)[:, :-1]
        assert torch.allclose(earlier, earlier_changed) == causal
    # and through a ComponentModel: CI at the first positions reads the last token
    torch.manual_seed(0)
    model = ComponentModel(TinyNet(), {"emb": 5, "fc*": 4}, {}, "global_transformer", [8])
    tokens = torch.randint(0, 7, (6, 3))
    tokens_changed = tokens.clone()
    tokens_changed[:, -1] = (tokens[:, -1] + 1) % 7
    ci, ci_changed = model.ci_of(tokens), model.ci_of(tokens_changed)
    assert any(not torch.allclose(ci[n][:, :-1], ci_changed[n][:, :-1]) for n in ci)


def test_global_transformer_reads_positions():
    """Without positions a bidirectional transformer is permutation-equivariant (checked on the hand-written
    one); with RoPE, permuting the input is not just permuting the output."""
    torch.manual_seed(0)
    net = CITransformer(5, 3, 8, layers=1, heads=2).double()
    a = torch.randn(1, 4, 5, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(reference_global_transformer(net, a[:, perm], positions=False),
                                   reference_global_transformer(net, a, positions=False)[:, perm])
        assert not torch.allclose(net(a[:, perm]), net(a)[:, perm], atol=1e-4)


def test_global_transformer_on_2d_inputs():
    """Non-sequence inputs (batch, d) are sequences of length 1: CI (batch, C), and training reaches the CI
    function."""
    torch.manual_seed(0)
    model = ComponentModel(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), {"0": 4, "2": 4}, {},
                           "global_transformer", [8])
    x = torch.randn(10, 5)
    ci = model.ci_of(x)
    assert {n: tuple(g.shape) for n, g in ci.items()} == {"0": (10, 4), "2": (10, 4)}
    net = model.ci_fns["global"].net
    assert isinstance(net, CITransformer)
    loss = training_losses(model, SPDConfig(ci_fn="global_transformer", ci_hidden=[8]), x, 0.5, IDENTITY)["total"]
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


def test_global_transformer_heads_must_divide_width():
    with pytest.raises(SPDError, match="spd.ci_transformer_heads=3 .* spd.ci_hidden"):
        ComponentModel(TinyNet(), {"fc*": 4}, {}, "global_transformer", [8], ci_heads=3)
