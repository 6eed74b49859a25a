"""Adversarial (PGD) masks, persistent PGD, subset routing and the importance-frequency term."""

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from spd_common import (ComponentModel, SPDConfig, average_gradients, importance_frequency_loss, masked_recon_loss,
                        masks_from_sources, optimize, pgd_recon_loss, pgd_sources, subset_rows, training_losses)
from spd_run import Dist
from test_spd_common import TinyNet, make_model

IDENTITY = lambda out: out  # noqa: E731


def test_pgd_masks_stay_within_ci_and_one():
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    target_out, inputs = model.run_target(tokens)
    ci, _ = model.causal_importances(inputs)
    cfg = SPDConfig(pgd_step_size=0.7, pgd_init="random")
    sources = pgd_sources(model, tokens, target_out, ci, cfg, IDENTITY, steps=5)
    masks, deltas = masks_from_sources(ci, sources)
    for n, g in ci.items():
        assert torch.all(masks[n] >= g - 1e-7) and torch.all(masks[n] <= 1)
        assert torch.all((deltas[n] >= 0) & (deltas[n] <= 1))
    assert any(torch.any((s > 0) & (s < 1)) or torch.any(s == 1) for s in sources.values())  # it moved


def test_pgd_with_no_steps_from_ci_is_the_ci_masked_loss():
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    target_out, inputs = model.run_target(tokens)
    ci, _ = model.causal_importances(inputs)
    cfg = SPDConfig(pgd_steps=0, pgd_init="ci", use_delta_component=True)
    ci_masked = masked_recon_loss(model, tokens, target_out, ci, None, "mse", IDENTITY)
    torch.testing.assert_close(pgd_recon_loss(model, tokens, target_out, ci, cfg, IDENTITY), ci_masked)


def test_one_pgd_step_by_hand():
    """y = W x with W = 1 decomposed as U V = 2 * 1, so W - UV = -1. Masks m = g + (1 - g) s and delta
    mask d give y = (2 m - d) x; against the target x, the loss is (2 m - d - 1)^2 x^2. From CI init
    (s = 0, d = 0) at g = 0.8 and x = 1: r = 2 m - d - 1 = 0.6 > 0, so the ascent raises s (dL/dm > 0)
    and would lower d (dL/dd < 0, clamped at 0): s = 0.1, d = 0, m = 0.82, loss = 0.64^2. At g = 0.5
    the residual is 0: a zero gradient, no step."""
    target = nn.Sequential(nn.Linear(1, 1, bias=False))
    model = ComponentModel(target, {"0": 1}, {}, "mlp", [4])
    with torch.no_grad():
        target[0].original.weight.fill_(1.0)
        model.decomposed["0"].components.U.fill_(2.0)
        model.decomposed["0"].components.V.fill_(1.0)
    x = torch.ones(1, 1)
    cfg = SPDConfig(pgd_step_size=0.1, pgd_init="ci", use_delta_component=True, pgd_steps=1)
    ci = {"0": torch.tensor([[0.8]])}
    sources = pgd_sources(model, x, x, ci, cfg, IDENTITY, steps=1)
    assert sources["mask/0"].item() == pytest.approx(0.1) and sources["delta/0"].item() == 0.0
    assert pgd_recon_loss(model, x, x, ci, cfg, IDENTITY).item() == pytest.approx(0.64 ** 2)
    sources = pgd_sources(model, x, x, {"0": torch.tensor([[0.5]])}, cfg, IDENTITY, steps=1)
    assert sources["mask/0"].item() == 0.0


def test_pgd_trains_components_and_ci_but_not_through_the_ascent():
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    target_out, inputs = model.run_target(tokens)
    ci, _ = model.causal_importances(inputs)
    loss = pgd_recon_loss(model, tokens, target_out, ci, SPDConfig(pgd_steps=2), IDENTITY)
    grads = torch.autograd.grad(loss, [*model.components.parameters(), *model.ci_fns.parameters()], allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads[len(list(model.components.parameters())):])  # into the CI fns


def test_subset_routing_with_all_modules_equals_masking_all():
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    target_out, _ = model.run_target(tokens)
    masks = {n: torch.rand(6, 3, 5) for n in model.names}
    deltas = {n: torch.rand(6, 3) for n in model.names}
    rows = subset_rows(masks, torch.full((6, 1), len(masks)))
    assert all(r.all() for r in rows.values())
    everything = masked_recon_loss(model, tokens, target_out, masks, deltas, "mse", IDENTITY)
    routed = masked_recon_loss(model, tokens, target_out, masks, deltas, "mse", IDENTITY, rows=rows)
    torch.testing.assert_close(routed, everything)
    rows = subset_rows(masks, torch.tensor([[1], [2], [3], [1], [2], [3]]))
    assert torch.stack(list(rows.values()), 1).sum(1).tolist() == [1, 2, 3, 1, 2, 3]


def test_importance_frequency_hand_computed():
    ci = {"a": torch.tensor([[0.5, 0.0], [1.0, 0.0]]), "b": torch.tensor([[[1.0], [3.0]]])}  # b: (batch, seq, C)
    expected = (math.log2(1 + 1.5) + math.log2(1)) / 2 + math.log2(1 + 4.0)
    assert importance_frequency_loss(ci).item() == pytest.approx(expected)


def gradients(rank, world_size, port, out):
    """Gradients of one training step's total loss (PGD, persistent PGD and the frequency term on)
    on rank `rank`'s shard of a fixed global batch, averaged over ranks as `train_step` does."""
    ddp = Dist(rank, world_size)
    if world_size > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world_size)
    torch.set_num_threads(1)
    results = {}
    for persistent in (False, True):
        model = make_model()
        cfg = SPDConfig(pgd_recon_coeff=1.0, pgd_steps=2, pgd_persistent=persistent, importance_minimality_beta=0.5,
                        stochastic_recon_routing="uniform_k_subset")
        tokens = torch.randint(0, 7, (8, 3), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        for _ in range(2):  # the second step starts from the persistent adversary's state
            model.zero_grad()
            losses = training_losses(model, cfg, ddp.shard(tokens), 0.5, IDENTITY, ddp)
            losses["total"].backward()
            params = [*model.components.parameters(), *model.ci_fns.parameters()]
            average_gradients(params, ddp)
        results[persistent] = [p.grad.clone() for p in params]
        results[f"freq{persistent}"] = ddp.mean(losses["importance_frequency"].detach())
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
    for key in one:
        for a, b in zip(one[key] if isinstance(one[key], list) else [one[key]],
                        two[key] if isinstance(two[key], list) else [two[key]]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=str(key))


def test_persistent_pgd_resumes_bit_identical(tmp_path):
    """Interrupted after the step-3 checkpoint and resumed, a run with persistent PGD ends in exactly the
    state of an uninterrupted one, adversary included."""
    cfg = SPDConfig(pgd_recon_coeff=1.0, pgd_persistent=True, pgd_steps=2, steps=6, batch_size=8, eval_batch_size=8,
                    checkpoint_every=3, eval_every=100, pgd_eval_steps=2)
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
    assert saved["t"].item() == 3 * cfg.pgd_steps and saved["source/mask/fc1"].shape == (8, 3, 5)
    resumed = make_model()
    optimize(resumed, cfg, batch, batch, tmp_path / "resumed", full_config={})
    for a, b in zip(whole.decomposition_state().items(), resumed.decomposition_state().items()):
        for k in a[1]:
            assert torch.equal(a[1][k], b[1][k]), (a[0], k)


@pytest.mark.parametrize("kind", ["global_shared_mlp", "global_transformer"])
def test_global_ci_function_reads_all_modules_and_trains(kind):
    """One network gives every module's CI; the transformer form is causal over positions."""
    torch.manual_seed(0)
    model = ComponentModel(TinyNet(), {"emb": 5, "fc*": 4}, {}, kind, [8])
    assert list(model.ci_fns) == ["global"]
    tokens = torch.randint(0, 7, (6, 3))
    ci = model.ci_of(tokens)
    assert {n: tuple(g.shape) for n, g in ci.items()} == {"emb": (6, 3, 5), "fc1": (6, 3, 4), "fc2": (6, 3, 4)}
    later_changed = tokens.clone()
    later_changed[:, -1] = (tokens[:, -1] + 1) % 7
    same_prefix = model.ci_of(later_changed)
    for n in ci:
        torch.testing.assert_close(same_prefix[n][:, :-1], ci[n][:, :-1])  # no position reads a later one
    cfg = SPDConfig(ci_fn=kind, ci_hidden=[8])
    loss = training_losses(model, cfg, tokens, 0.5, IDENTITY)["total"]
    grads = torch.autograd.grad(loss, list(model.ci_fns.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    with pytest.raises(Exception, match="reads every module's input at once"):
        model.module_ci("fc1", torch.zeros(2, 4))

