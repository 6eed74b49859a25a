"""Conv2d components (exact reconstruction, masks by hand, CI on patches) and the shapes experiment."""

import pytest
import torch
import torch.nn as nn

from spd_common import ComponentModel, SPDConfig, evaluate, importance_minimality_loss, layerwise_recon_loss
from spd_config import SPDError


class ConvNet(nn.Module):
    """conv1 (the one under test) -> ReLU -> conv2 (3x3, same size, no bias) -> mean over locations -> fc."""

    def __init__(self, kernel, stride, padding, dilation=1, padding_mode="zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation,
                               padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


GEOMETRIES = [(1, 1, 0), (3, 1, 1), (5, 2, 2), (4, 3, 1), (3, 2, 0, 2, "reflect"), (2, 1, "same"),
              (3, 1, 1, 1, "circular")]  # kernel, stride, padding[, dilation, padding mode]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("ci_fn", ["mlp", "vector_mlp"])
def test_conv_all_masks_one_with_delta_reproduces_target(geometry, ci_fn):
    torch.manual_seed(0)
    model = ComponentModel(ConvNet(*geometry), {"conv*": 6, "fc": 3}, {}, ci_fn, [4])
    x = torch.randn(2, 3, 11, 9)
    target_out, inputs = model.run_target(x)
    ci = model.ci_of(x)
    out_shape = model.target.conv1(x).shape  # (batch, 5, H_out, W_out)
    assert ci["conv1"].shape == (2, *out_shape[2:], 6)  # channels-last, one CI per output location
    assert ci["conv2"].shape == (2, *out_shape[2:], 6) and ci["fc"].shape == (2, 3)
    ones = {n: torch.ones_like(g) for n, g in ci.items()}
    with model.masked(ones, {n: torch.ones(g.shape[:-1]) for n, g in ci.items()}):
        torch.testing.assert_close(model(x), target_out, atol=1e-5, rtol=1e-5)
    with model.masked(ones):  # random U, V without the delta: not the target
        assert not torch.allclose(model(x), target_out, atol=1e-3)
    # U V = W exactly (C = 6 >= rank 5 of conv1, 4 of conv2): masks 1 alone reproduce the target
    with torch.no_grad():
        for n in ("conv1", "conv2"):
            mod = model.decomposed[n]
            u, s, vh = torch.linalg.svd(mod.target_weight(), full_matrices=False)
            mod.components.U.zero_()[:, :len(s)] = u * s
            mod.components.V.zero_()[:len(s)] = vh
    with model.masked({n: ones[n] for n in ("conv1", "conv2")}):
        torch.testing.assert_close(model(x), target_out, atol=1e-5, rtol=1e-5)
    # inner acts = each patch times V: the patches CI functions read are the ones the conv multiplies
    mod = model.decomposed["conv1"]
    patches = mod.matrix_input(inputs["conv1"])
    torch.testing.assert_close(mod.inner_acts(inputs["conv1"]), patches @ mod.components.V.T, atol=1e-5, rtol=1e-5)


def test_conv_masked_forward_by_hand():
    """One 1x1 conv, 2 -> 2 channels, U = V = identity, bias (1, -1). Mask 1 for subcomponent 0 at location
    (0, 1) only, 0 elsewhere: the output is the bias everywhere, plus x[0] at that location in channel 0."""
    conv = nn.Conv2d(2, 2, 1)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([1.0, -1.0]))
    model = ComponentModel(nn.Sequential(conv), {"0": 2}, {}, "mlp", [4])
    with torch.no_grad():
        model.components["0"].U.copy_(torch.eye(2))
        model.components["0"].V.copy_(torch.eye(2))
    x = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: [[0, 1], [2, 3]], channel 1: [[4, 5], [6, 7]]
    mask = torch.zeros(1, 2, 2, 2)
    mask[0, 0, 1, 0] = 1.0
    with model.masked({"0": mask}):
        out = model(x)
    expected = torch.tensor([[[1.0, 2.0], [1.0, 1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    assert torch.equal(out[0], expected)


def test_grouped_conv_is_refused_in_one_line():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(SPDError, match=r"module '0' is a Conv2d with groups = 2; only groups = 1"):
        ComponentModel(net, {"0": 4}, {}, "mlp", [4])


def test_importance_minimality_is_a_mean_per_module_over_its_own_locations():
    """A conv module's CI (batch 2, 2 x 2 locations, C 1) and a linear one's (batch 2, C 1): each module's
    sum over its rows divided by its own row count, so the conv's 4 locations count as one image."""
    conv = torch.tensor([0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]).view(2, 2, 2, 1)  # sum 3 over 8 rows
    fc = torch.tensor([[0.2], [0.6]])  # sum 0.8 over 2 rows
    assert importance_minimality_loss({"conv": conv, "fc": fc}, 1.0).item() == pytest.approx(3 / 8 + 0.8 / 2)


def test_conv_generic_metrics_and_routed_layerwise_loss():
    torch.manual_seed(0)
    model = ComponentModel(ConvNet(3, 2, 1), {"conv*": 6, "fc": 3}, {}, "mlp", [4])
    x = torch.randn(4, 3, 8, 8)
    cfg = SPDConfig(modules={"conv*": 6, "fc": 3}, ci_threshold=0.0)
    metrics = evaluate(model, cfg, x, lambda out: out)
    ci = model.ci_of(x)
    # L0 of a conv: mean active subcomponents per output location, like per token in an LM
    assert metrics["l0/conv1"] == pytest.approx((ci["conv1"] > 0).sum(-1).float().mean().item())
    assert metrics["n_alive/conv1"] == int((ci["conv1"] > 0).flatten(0, 2).any(0).sum())
    target_out, inputs = model.run_target(x)
    masks = {n: torch.ones_like(g) for n, g in ci.items()}
    deltas = {n: torch.ones(g.shape[:-1]) for n, g in ci.items()}
    route = torch.tensor([0, 1, 2, 0])  # one module per image: the masks' first axis is the batch for a conv too
    loss = layerwise_recon_loss(model, x, target_out, masks, deltas, "mse", lambda out: out, route=route)
    assert loss.item() < 1e-10  # masks 1 + delta on each image's module: the target
