"""The generic SPD machinery: components, CI functions, masks, losses against hand-computed values."""

import math

import pytest
import torch
import torch.nn as nn

from spd_ci import ScalarMLPs, SharedMLP, VectorMLPs, hard_sigmoids
from spd_common import (ComponentModel, SPDConfig, StepBatch, annealed_importance_coeff, annealed_p, faithfulness_loss,
                        importance_minimality_loss, layerwise_recon_loss, lr_at, masked_recon_loss, optimize,
                        output_loss, sample_masks, training_losses)
from spd_config import SPDError


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3, bias=False)

    def forward(self, tokens):
        return self.fc2(torch.relu(self.fc1(self.emb(tokens))))


def make_model(ci_fn="mlp", C=5):
    torch.manual_seed(0)
    return ComponentModel(TinyNet(), {"emb": C, "fc*": C}, {}, ci_fn, [8])


def exact_factorisation(model):
    """Set U, V so that UV = W exactly (C >= rank), via the SVD."""
    with torch.no_grad():
        for name in model.untied_names():
            mod = model.decomposed[name]
            W = mod.target_weight()
            u, s, vh = torch.linalg.svd(W, full_matrices=False)
            r = s.numel()
            comps = mod.components
            comps.U.zero_()
            comps.V.zero_()
            comps.U[:, :r] = u * s
            comps.V[:r] = vh


def test_pattern_matching_nothing_names_existing_modules():
    with pytest.raises(SPDError, match=r"'mlp\.\*' matches no .*emb, fc1, fc2"):
        ComponentModel(TinyNet(), {"mlp.*": 3}, {}, "mlp", [4])


def test_patterns_attach_to_matched_modules_and_keep_target_output():
    net = TinyNet()
    tokens = torch.randint(0, 7, (2, 5))
    before = net(tokens)
    model = ComponentModel(net, {"fc*": 3}, {}, "mlp", [4])
    assert model.names == ["fc1", "fc2"]
    assert torch.equal(model(tokens), before)  # no masks set: the original modules run
    U, V = model.factors("fc1")
    assert U.shape == (6, 3) and V.shape == (3, 4)
    restored = model.restore_target()
    assert restored is net and type(net.fc1) is nn.Linear and type(net.fc2) is nn.Linear
    assert torch.equal(net(tokens), before)


@pytest.mark.parametrize("ci_fn", ["mlp", "vector_mlp", "shared_mlp"])
def test_all_masks_one_with_delta_reproduces_target(ci_fn):
    model = make_model(ci_fn)
    tokens = torch.randint(0, 7, (4, 3))
    target_out, _ = model.run_target(tokens)
    ones = {n: torch.ones(4, 3, model.C[n]) for n in model.names}
    deltas = {n: torch.ones(4, 3) for n in model.names}
    with model.masked(ones, deltas):
        out = model(tokens)
    torch.testing.assert_close(out, target_out, atol=1e-5, rtol=1e-5)
    # without the delta component the random init does NOT reproduce the target ...
    with model.masked(ones):
        assert not torch.allclose(model(tokens), target_out, atol=1e-3)
    # ... but an exact factorisation does
    exact_factorisation(model)
    with model.masked(ones):
        torch.testing.assert_close(model(tokens), target_out, atol=1e-5, rtol=1e-5)
    assert faithfulness_loss(model).item() < 1e-10


def test_masked_forward_matches_hand_computation():
    model = make_model()
    x = torch.randn(2, 4)
    mod = model.decomposed["fc1"]
    mask = torch.rand(2, 5)
    U, V = mod.components.U, mod.components.V
    expected = torch.stack([(U @ torch.diag(mask[b]) @ V) @ x[b] for b in range(2)]) + mod.original.bias
    mod.mask = mask
    try:
        torch.testing.assert_close(mod(x), expected)
        # with the delta component at d[b]: + d[b] (W - UV) x[b]
        mod.delta_mask = delta = torch.tensor([0.3, 1.0])
        W = mod.target_weight()
        expected = expected + torch.stack([delta[b] * (W - U @ V) @ x[b] for b in range(2)])
        torch.testing.assert_close(mod(x), expected)
    finally:
        mod.mask = mod.delta_mask = None


def test_tied_components_are_transposes():
    lin1, lin2 = nn.Linear(5, 2, bias=False), nn.Linear(2, 5)
    net = nn.Sequential(lin1, lin2)
    model = ComponentModel(net, {"0": 4, "1": 4}, {"1": "0"}, "mlp", [4])
    U1, V1 = model.decomposed["0"].components.factors()
    U2, V2 = model.decomposed["1"].components.factors()
    assert torch.equal(U2, V1.T) and torch.equal(V2, U1.T)
    assert model.untied_names() == ["0"]
    assert len(list(model.components.parameters())) == 2  # shared, not duplicated
    with pytest.raises(SPDError, match="same C"):
        ComponentModel(nn.Sequential(nn.Linear(5, 2), nn.Linear(2, 5)), {"0": 4, "1": 3}, {"1": "0"}, "mlp", [4])


def test_leaky_hard_sigmoids_values_and_gradients():
    x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    lower, upper = hard_sigmoids(x)
    torch.testing.assert_close(lower, torch.tensor([-0.02, 0.5, 1.0]))
    torch.testing.assert_close(upper, torch.tensor([0.0, 0.5, 1.02]))
    (g,) = torch.autograd.grad(lower.sum(), x, retain_graph=True)
    torch.testing.assert_close(g, torch.tensor([0.01, 1.0, 0.0]))
    (g,) = torch.autograd.grad(upper.sum(), x)
    torch.testing.assert_close(g, torch.tensor([0.0, 1.0, 0.01]))


def test_clamped_sigmoid_leaks_only_backward_and_only_upward():
    """Forward: clamp to [0, 1]. Backward: the gradient on [0, 1]; below 0, 0.01 of it where it is
    negative (descent raises x: a dead subcomponent revives) and none where it would push x further down."""
    x = torch.tensor([-1.0, -1.0, 0.5, 2.0], requires_grad=True)
    y, upper = hard_sigmoids(x, "clamp_forward_leaky_backward")
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.5, 1.0]))
    (g,) = torch.autograd.grad(y, x, torch.tensor([-1.0, 1.0, 1.0, 1.0]), retain_graph=True)
    torch.testing.assert_close(g, torch.tensor([-0.01, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(upper, hard_sigmoids(x)[1])  # the upper one is the same for both kinds
    (g,) = torch.autograd.grad((y + 2 * upper).sum(), x)  # both outputs' gradients add
    torch.testing.assert_close(g, torch.tensor([0.0, 0.0, 3.0, 0.02]))


@pytest.mark.parametrize("cls,in_dim", [(ScalarMLPs, None), (VectorMLPs, 6), (SharedMLP, 6)])
@pytest.mark.parametrize("hidden", [[8], [8, 4]])
def test_ci_fn_shapes(cls, in_dim, hidden):
    C = 5
    fn = cls(C, hidden) if in_dim is None else cls(C, in_dim, hidden)
    x = torch.randn(3, 2, in_dim or C)
    assert fn(x).shape == (3, 2, C)


@pytest.mark.parametrize("hidden", [[8], [8, 4]])
def test_scalar_mlp_components_are_independent(hidden):
    """CI of subcomponent c depends only on h_c and on c's own parameters."""
    C = 5
    fn = ScalarMLPs(C, hidden)
    h = torch.randn(4, C, requires_grad=True)
    (jac,) = torch.autograd.grad(fn(h)[:, 2].sum(), h)
    assert torch.all(jac[:, [0, 1, 3, 4]] == 0) and torch.any(jac[:, 2] != 0)
    before = fn(h).detach()
    with torch.no_grad():
        for p in fn.parameters():
            p[2] += 0.5  # perturb subcomponent 2's MLP only
    after = fn(h).detach()
    assert torch.equal(after[:, [0, 1, 3, 4]], before[:, [0, 1, 3, 4]])
    assert not torch.equal(after[:, 2], before[:, 2])


def test_vector_mlp_matches_per_component_loop():
    C, d = 4, 6
    fn = VectorMLPs(C, d, [8, 3])
    a = torch.randn(5, d)
    ws, bs = fn.layers[0::2], fn.layers[1::2]
    for c in range(C):
        x = a
        for i, (w, b) in enumerate(zip(ws, bs)):
            x = x @ w[c] + b[c]
            if i < len(ws) - 1:
                x = torch.nn.functional.gelu(x)
        torch.testing.assert_close(fn(a)[:, c], x[:, 0])


def test_sample_masks_continuous_and_binomial():
    g = {"a": torch.tensor([[0.0, 1.0, 0.25]]).expand(2000, 3)}
    masks, deltas = sample_masks(g, "continuous", use_delta=True)
    m = masks["a"]
    assert torch.all(m[:, 1] == 1) and m[:, 0].min() >= 0 and m[:, 0].max() <= 1
    assert abs(m[:, 2].mean().item() - (0.25 + 0.75 * 0.5)) < 0.03
    assert deltas["a"].shape == (2000,)
    masks, _ = sample_masks(g, "binomial", use_delta=False)
    assert set(masks["a"][:, 2].unique().tolist()) == {0.25, 1.0}


def test_importance_minimality_hand_computed():
    ci = {"a": torch.tensor([[0.5, 0.0], [1.0, 0.25]]), "b": torch.tensor([[0.1], [0.2]])}
    # p = 1: (0.5 + 0 + 1 + 0.25 + 0.1 + 0.2) / 2 examples
    assert importance_minimality_loss(ci, 1.0).item() == pytest.approx(2.05 / 2)
    # p = 2: (0.25 + 0 + 1 + 0.0625 + 0.01 + 0.04) / 2
    assert importance_minimality_loss(ci, 2.0).item() == pytest.approx(1.3625 / 2)
    # batch x seq: examples are all leading positions
    assert importance_minimality_loss({"a": torch.ones(2, 3, 4)}, 1.0).item() == pytest.approx(4.0)


def test_output_losses_hand_computed():
    pred, tgt = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert output_loss(pred, tgt, "mse").item() == pytest.approx((1 + 0 + 1 + 1) / 4)
    p = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> (1/4, 3/4)
    q = torch.tensor([[0.0, 0.0]])  # (1/2, 1/2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert output_loss(q, p, "kl").item() == pytest.approx(kl)


def test_faithfulness_hand_computed():
    net = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    model = ComponentModel(net, {"0": 1}, {}, "mlp", [2])
    with torch.no_grad():
        model.decomposed["0"].components.U.copy_(torch.tensor([[1.0], [0.0]]))
        model.decomposed["0"].components.V.copy_(torch.tensor([[1.0, 1.0]]))
    # W - UV = [[0, 1], [3, 4]] -> (0 + 1 + 9 + 16) / 4
    assert faithfulness_loss(model).item() == pytest.approx(26 / 4)


def test_no_modules_is_a_one_line_error():
    with pytest.raises(SPDError, match="no modules to decompose: set spd.modules"):
        ComponentModel(TinyNet(), {}, {}, "mlp", [8])


def test_factor_penalties_hand_computed_and_weighted_into_the_total():
    """U = [[1], [-2]], V = [[3, 0]]; a tied module adds no factors of its own. L1: (1 + 2 + 3 + 0) / 4,
    L2: (1 + 4 + 9 + 0) / 4; the total holds coefficient x term."""
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model = ComponentModel(net, {"0": 1, "1": 1}, {"1": "0"}, "mlp", [2])
    with torch.no_grad():
        model.decomposed["0"].components.U.copy_(torch.tensor([[1.0], [-2.0]]))
        model.decomposed["0"].components.V.copy_(torch.tensor([[3.0, 0.0]]))
    cfg = SPDConfig(stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None,
                    importance_minimality_coeff=None, factor_l1_coeff=0.5,
                    factor_l2_coeff=2.0, steps=10)
    losses = training_losses(model, cfg, torch.randn(4, 2), 0.0, lambda out: out)
    assert losses["factor_l1"].item() == pytest.approx(6 / 4)
    assert losses["factor_l2"].item() == pytest.approx(14 / 4)
    assert losses["total"].item() == pytest.approx(0.5 * 6 / 4 + 2.0 * 14 / 4)


def test_layerwise_masks_one_module_at_a_time():
    """Module emb faithful (masks 1 + delta 1 = target exactly), fc2 ablated (masks 0): the layerwise
    loss is the mean of 0 (emb alone) and the loss of ablating fc2 alone, unaffected by fc1's mask."""
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    b = StepBatch.of(model, tokens, lambda o: o, "mse")
    masks = {"emb": torch.ones(6, 3, 5), "fc2": torch.zeros(6, 3, 5)}
    deltas = {"emb": torch.ones(6, 3), "fc2": torch.zeros(6, 3)}
    loss = layerwise_recon_loss(b, masks, deltas)
    fc2_alone = masked_recon_loss(model, tokens, b.target_out, {"fc2": masks["fc2"]}, None, "mse", lambda o: o)
    with model.masked({"fc2": masks["fc2"]}):
        assert torch.all(model(tokens) == 0)  # fc2 has no bias: all components off leaves nothing
    assert fc2_alone > 0.01
    torch.testing.assert_close(loss, fc2_alone / 2)


def test_layerwise_reuses_inner_acts_exactly():
    """Each module masked alone sees the target's input, so the layerwise loss with the inner acts
    computed once (as training does) has the same value and gradients as recomputing them."""
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    b = StepBatch.of(model, tokens, lambda o: o, "mse")
    masks = {n: torch.rand(6, 3, 5) for n in model.names}
    params = list(model.components.parameters())
    plain = layerwise_recon_loss(b, masks, None)
    grads = torch.autograd.grad(plain, params)
    reused = layerwise_recon_loss(b, masks, None, model.inner_acts(b.inputs))
    torch.testing.assert_close(reused, plain)
    for g, h in zip(grads, torch.autograd.grad(reused, params)):
        torch.testing.assert_close(h, g)


def test_routed_layerwise_masks_one_module_per_example_and_averages_to_the_exact_loss():
    """Example b masks module route[b] alone: its output is that of the model with only that module
    masked. Over the M cyclic shifts of a route, the routed loss averages to the exact layerwise loss."""
    model = make_model()
    tokens = torch.randint(0, 7, (6, 3))
    b = StepBatch.of(model, tokens, lambda o: o, "mse")
    masks = {n: torch.rand(6, 3, 5) for n in model.names}
    deltas = {n: torch.rand(6, 3) for n in model.names}
    route = torch.tensor([0, 1, 2, 2, 1, 0])
    rows = {n: route == i for i, n in enumerate(model.names)}
    with torch.no_grad(), model.masked(masks, deltas, rows=rows):
        routed = model(tokens)
    for row, i in enumerate(route.tolist()):
        n = model.names[i]
        with torch.no_grad(), model.masked({n: masks[n]}, {n: deltas[n]}):
            torch.testing.assert_close(routed[row], model(tokens)[row])
    exact = layerwise_recon_loss(b, masks, deltas)
    shifts = [layerwise_recon_loss(b, masks, deltas, model.inner_acts(b.inputs), (torch.arange(6) + s) % 3)
              for s in range(3)]
    torch.testing.assert_close(sum(shifts) / 3, exact)
    grads = torch.autograd.grad(shifts[0], list(model.components.parameters()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # every module's components learn


def test_lr_schedules_and_p_annealing():
    cfg = SPDConfig(steps=100, lr=1.0, lr_schedule="cosine", lr_warmup_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5)
    cfg = SPDConfig(steps=80, lr=2.0, lr_schedule="cosine_quarter", lr_warmup_frac=0.25)  # t = (step - 20) / 60
    assert lr_at(19, cfg) == pytest.approx(2.0)  # last warm-up step
    assert lr_at(20, cfg) == pytest.approx(2.0)  # cos(0)
    assert lr_at(40, cfg) == pytest.approx(3 ** 0.5)  # cos(pi / 6) = sqrt(3) / 2
    assert lr_at(60, cfg) == pytest.approx(1.0)  # cos(pi / 3) = 1 / 2
    cfg = SPDConfig(steps=100, lr=2.0, lr_schedule="linear")
    assert lr_at(50, cfg) == pytest.approx(1.0)
    assert lr_at(50, SPDConfig(steps=100, lr=2.0, lr_schedule="constant")) == 2.0
    cfg = SPDConfig(p=2.0, p_anneal_final=1.0, p_anneal_start_frac=0.5, p_anneal_end_frac=1.0)
    assert annealed_p(cfg, 0.25) == 2.0 and annealed_p(cfg, 0.75) == pytest.approx(1.5)
    assert annealed_p(cfg, 1.0) == pytest.approx(1.0)


def test_importance_coeff_anneals_from_initial_and_weights_the_total():
    cfg = SPDConfig(importance_minimality_coeff=2e-5, importance_minimality_coeff_initial=4e-5,
                    importance_minimality_anneal_end_frac=0.5)
    assert annealed_importance_coeff(cfg, 0.0) == pytest.approx(4e-5)
    assert annealed_importance_coeff(cfg, 0.25) == pytest.approx(3e-5)
    assert annealed_importance_coeff(cfg, 0.5) == pytest.approx(2e-5)
    assert annealed_importance_coeff(cfg, 0.9) == pytest.approx(2e-5)  # held after the end fraction
    assert annealed_importance_coeff(SPDConfig(importance_minimality_coeff=2e-5), 0.0) == 2e-5  # no initial: fixed
    late = SPDConfig(importance_minimality_coeff=2e-5, importance_minimality_coeff_initial=4e-5,
                     importance_minimality_anneal_start_frac=0.5, importance_minimality_anneal_end_frac=0.9)
    assert annealed_importance_coeff(late, 0.4) == pytest.approx(4e-5)  # held before the start fraction
    assert annealed_importance_coeff(late, 0.7) == pytest.approx(3e-5)
    model, tokens = make_model(), torch.randint(0, 7, (6, 3))
    cfg = SPDConfig(importance_minimality_coeff=1.0, importance_minimality_coeff_initial=3.0, p=2.0,
                    stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None)
    for frac, beta3 in [(0.0, 3.0), (0.25, 2.0), (1.0, 1.0)]:
        losses = training_losses(model, cfg, tokens, frac, lambda out: out)
        torch.testing.assert_close(losses["total"], beta3 * losses["importance_minimality"])


def test_grad_accumulation_matches_one_batch_and_bf16_autocast_runs(tmp_path):
    """With deterministic losses, 2 micro-batches of 4 take the same steps as one batch of 8."""
    def run(**kw):
        model = make_model()
        cfg = SPDConfig(stochastic_recon_coeff=None, stochastic_recon_layerwise_coeff=None,
                        ci_masked_recon_coeff=1.0, importance_minimality_coeff=1e-2, steps=3, batch_size=8,
                        eval_batch_size=8, lr=1e-2, lr_schedule="constant", **kw)
        batch = lambda step: torch.randint(0, 7, (8, 3), generator=torch.Generator().manual_seed(step))  # noqa: E731
        run_dir = tmp_path / "_".join(kw) if kw else tmp_path / "plain"
        run_dir.mkdir()
        results = optimize(model, cfg, batch, batch, run_dir, full_config={})
        return model, results

    one, r1 = run()
    two, r2 = run(grad_accum_steps=2)
    for p1, p2 in zip(one.components.parameters(), two.components.parameters()):
        torch.testing.assert_close(p1, p2)
    assert r1["train/total"] == pytest.approx(r2["train/total"], rel=1e-5)
    _, r3 = run(autocast_bf16=True)  # bf16 on CPU: slow but the same code path as on CUDA
    assert math.isfinite(r3["train/total"]) and "peak_gpu_mem_mb" not in r3


def test_batches_may_carry_more_than_the_models_input(tmp_path):
    """A batch of (tokens, labels) or {"tokens", "labels"}, with `input_fn` picking the model's input,
    trains exactly what the bare tensor does, through micro-batches and a 2-rank shard alike."""
    from spd_run import Dist, map_batch, split_batch

    tokens = lambda step: torch.randint(0, 7, (8, 3), generator=torch.Generator().manual_seed(step))  # noqa: E731
    labels = lambda step: torch.arange(8) + step  # noqa: E731
    cfg = SPDConfig(steps=3, batch_size=8, eval_batch_size=8, eval_every=2, grad_accum_steps=2)

    def run(name, batch, input_fn):
        model = make_model()
        (tmp_path / name).mkdir()
        optimize(model, cfg, batch, batch, tmp_path / name, full_config={}, input_fn=input_fn)
        return model

    plain = run("plain", tokens, lambda b: b)
    pair = run("pair", lambda s: (tokens(s), labels(s)), lambda b: b[0])
    for p1, p2 in zip(plain.components.parameters(), pair.components.parameters()):
        assert torch.equal(p1, p2)
    batch = {"tokens": tokens(0), "labels": labels(0)}
    halves = [Dist(r, 2).shard(batch) for r in range(2)]
    assert torch.equal(halves[1]["labels"], torch.arange(4, 8)) and halves[0]["tokens"].shape == (4, 3)
    assert [m["labels"].tolist() for m in split_batch(batch, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(SPDError, match="a batch must be a tensor, or a tuple / list / dict of tensors, not str"):
        map_batch(("text",), lambda t: t)


def test_a_dict_input_is_passed_as_keyword_arguments():
    class KeywordNet(TinyNet):
        def forward(self, tokens, scale=1.0):
            return super().forward(tokens) * scale

    torch.manual_seed(0)
    model = ComponentModel(KeywordNet(), {"fc1": 4}, {}, "mlp", [8])
    tokens = torch.randint(0, 7, (5, 3))
    out, inputs = model.run_target({"tokens": tokens, "scale": 2.0})
    torch.testing.assert_close(out, 2.0 * model.target(tokens))
    assert inputs["fc1"].shape == (5, 3, 4)
    torch.testing.assert_close(model({"tokens": tokens}), model(tokens))
