"""Train a residual-MLP target for compressed computation (the SPD paper's toy model).

n features are embedded in a residual stream of width d_embed by a fixed random W_E with unit-norm
rows and read off by W_E^T. ReLU MLPs write into the stream; with fewer neurons than features they
must compress the computation of y_i = x_i + ReLU(x_i). Features are active with probability p,
with values ~ U[-1, 1]. Paper hyperparameters: AdamW, weight decay 0.01, lr 3e-3 cosine, batch 2048.

    python -m train_targets.train_resid_mlp configs/resid_mlp1.yaml   # reads the `target:` section
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from spd_config import option
from spd_run import load_or_train_target, step_generator, target_main


@dataclass
class ResidMLPTargetConfig:
    n_features: int = option(100, "number of input features", ge=1)
    d_embed: int = option(1000, "residual stream width", ge=1)
    d_mlp: int = option(50, "ReLU neurons per MLP layer", ge=1)
    n_layers: int = option(1, "number of MLP layers", ge=1)
    mlp_bias: bool = option(False, "biases in W_in and W_out (with them, 2- and 3-layer targets fit worse, and "
                               "SPD on 1 layer keeps ~25 extra W_out subcomponents; the paper has none)")
    feature_probability: float = option(0.01, "probability each feature is active (value ~ U[-1, 1])", gt=0, le=1)
    steps: int = option(10_000, "training steps", ge=1)
    batch_size: int = option(2048, "training batch size", ge=1)
    lr: float = option(3e-3, "AdamW peak learning rate (cosine decay)", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay", ge=0)
    seed: int = option(0, "seed of the embedding, the initial weights and the data")
    path: str = option("targets/resid_mlp.pt", "where the trained target is cached")


class MLP(nn.Module):
    def __init__(self, d_embed: int, d_mlp: int, bias: bool):
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=bias)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=bias)

    def forward(self, resid: Tensor) -> Tensor:
        return self.mlp_out(F.relu(self.mlp_in(resid)))


class ResidMLP(nn.Module):
    """(batch, n_features) -> (batch, n_features): embed, add each MLP's output, unembed."""

    def __init__(self, cfg: ResidMLPTargetConfig):
        super().__init__()
        gen = torch.Generator().manual_seed(cfg.seed)
        W_E = torch.randn(cfg.n_features, cfg.d_embed, generator=gen)
        self.register_buffer("W_E", W_E / W_E.norm(dim=1, keepdim=True))  # fixed, unit-norm rows
        self.layers = nn.ModuleList(MLP(cfg.d_embed, cfg.d_mlp, cfg.mlp_bias) for _ in range(cfg.n_layers))

    def forward(self, x: Tensor) -> Tensor:
        resid = x @ self.W_E
        for layer in self.layers:
            resid = resid + layer(resid)
        return resid @ self.W_E.T


def resid_mlp_batch(n_features: int, feature_probability: float, batch_size: int, seed: int, step: int,
                    device: torch.device | str = "cpu") -> Tensor:
    """Batch number `step` of data stream `seed`, (batch, n_features): each feature active with
    probability p, with value ~ U[-1, 1]."""
    gen = step_generator(seed, step)
    values = 2 * torch.rand(batch_size, n_features, generator=gen) - 1
    active = torch.rand(batch_size, n_features, generator=gen) < feature_probability
    return (values * active).to(device)


def labels(x: Tensor) -> Tensor:
    """What the target must compute: y_i = x_i + ReLU(x_i)."""
    return x + F.relu(x)


def train_resid_mlp(cfg: ResidMLPTargetConfig) -> ResidMLP:
    torch.manual_seed(cfg.seed)
    model = ResidMLP(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        x = resid_mlp_batch(cfg.n_features, cfg.feature_probability, cfg.batch_size, cfg.seed + 1, step)
        loss = F.mse_loss(model(x), labels(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    x = resid_mlp_batch(cfg.n_features, cfg.feature_probability, 8192, cfg.seed + 2, 0)
    with torch.no_grad():
        loss, baseline = F.mse_loss(model(x), labels(x)).item(), F.mse_loss(x, labels(x)).item()
    print(f"Residual MLP target trained: MSE {loss:.3g} (identity-only baseline {baseline:.3g})")
    return model


def load_or_train_resid_mlp(cfg: ResidMLPTargetConfig) -> ResidMLP:
    """The cached target at cfg.path, trained first (and cached) when missing."""
    return load_or_train_target(cfg, lambda: ResidMLP(cfg), lambda: train_resid_mlp(cfg),
                                ("n_features", "d_embed", "d_mlp", "n_layers", "mlp_bias", "seed"))


if __name__ == "__main__":
    target_main(ResidMLPTargetConfig, load_or_train_resid_mlp)
