"""Train a toy model of superposition (TMS) target: x̂ = ReLU(W^T H W x + b).

W (n_hidden x n_features) encodes, the decoder reuses W^T (tied), H is an optional stack of fixed
identity matrices (the "+ID" variants). Paper hyperparameters: AdamW, weight decay 0.01,
lr 5e-3 constant, 10k steps, batch 1024 (5-2) or 8192 (40-10).

    python -m train_targets.train_tms configs/tms_5-2.yaml   # reads the config's `target:` section
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

from spd_config import SPDError, option
from spd_run import load_or_train_target, step_generator, target_main


@dataclass
class TMSTargetConfig:
    n_features: int = option(5, "number of input features n", ge=1)
    n_hidden: int = option(2, "hidden width m", ge=1)
    n_hidden_layers: int = option(0, "fixed m x m identity layers between encoder and decoder", ge=0)
    feature_probability: float = option(0.05, "probability each feature is active (value ~ U[0, 1])", gt=0, le=1)
    steps: int = option(10_000, "training steps", ge=1)
    batch_size: int = option(1024, "training batch size", ge=1)
    lr: float = option(5e-3, "AdamW learning rate (constant)", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay", ge=0)
    seed: int = option(0, "training seed (some seeds leave a feature dead: the check says so)")
    min_column_norm: float = option(0.5, "every column of W must reach this norm, else the target is rejected", ge=0)
    path: str = option("targets/tms.pt", "where the trained target is cached")


class TMSModel(nn.Module):
    def __init__(self, n_features: int, n_hidden: int, n_hidden_layers: int = 0):
        super().__init__()
        self.linear1 = nn.Linear(n_features, n_hidden, bias=False)
        self.hidden_layers = nn.ModuleList(nn.Linear(n_hidden, n_hidden, bias=False) for _ in range(n_hidden_layers))
        for layer in self.hidden_layers:
            nn.init.eye_(layer.weight)
            layer.weight.requires_grad_(False)
        self.linear2 = nn.Linear(n_hidden, n_features, bias=True)  # weight = linear1.weight^T (tied)
        # nn.Linear's default init gives some features a negative bias that the ReLU never lets
        # recover (a dead feature); zero biases and Xavier-normal W, as in the original TMS work.
        nn.init.xavier_normal_(self.linear1.weight)
        nn.init.zeros_(self.linear2.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, n_features) -> (batch, n_features)."""
        h = self.linear1(x)
        for layer in self.hidden_layers:
            h = layer(h)
        return F.relu(self.linear2(h))


class _TransposeOf(nn.Module):
    """Parametrisation making the decoder weight the encoder's transpose while training."""

    def __init__(self, encoder: nn.Linear):
        super().__init__()
        self._encoder = [encoder]

    def forward(self, _unused: Tensor) -> Tensor:
        return self._encoder[0].weight.T


def tms_batch(n_features: int, feature_probability: float, batch_size: int, seed: int, step: int,
              device: torch.device | str = "cpu") -> Tensor:
    """Batch number `step` of data stream `seed`, (batch, n_features): each feature is active with
    probability p, with value ~ U[0, 1]. Indexed by step, so a resumed run sees the same data."""
    gen = step_generator(seed, step)
    values = torch.rand(batch_size, n_features, generator=gen)
    active = torch.rand(batch_size, n_features, generator=gen) < feature_probability
    return (values * active).to(device)


def train_tms(cfg: TMSTargetConfig) -> TMSModel:
    """Train a TMS target with tied weights; reject it if a feature is left unrepresented."""
    torch.manual_seed(cfg.seed)
    model = TMSModel(cfg.n_features, cfg.n_hidden, cfg.n_hidden_layers)
    parametrize.register_parametrization(model.linear2, "weight", _TransposeOf(model.linear1), unsafe=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        x = tms_batch(cfg.n_features, cfg.feature_probability, cfg.batch_size, cfg.seed + 1, step)
        loss = F.mse_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    parametrize.remove_parametrizations(model.linear2, "weight")  # now a plain copy of W^T
    # A fresh module holds contiguous weights, as a cached target loads: the run that trains its target
    # then computes bit-identically to the runs that load it (a transposed view takes another matmul path).
    trained = TMSModel(cfg.n_features, cfg.n_hidden, cfg.n_hidden_layers)
    trained.load_state_dict(model.state_dict())
    model = trained
    norms = model.linear1.weight.detach().norm(dim=0)
    dead = [i for i, v in enumerate(norms.tolist()) if v < cfg.min_column_norm]
    print(f"TMS target trained: loss {loss.item():.4g}, column norms of W "
          f"{', '.join(f'{v:.2f}' for v in norms.tolist()[:10])}{' ...' if len(norms) > 10 else ''}")
    if dead:
        raise SPDError(f"TMS target with seed {cfg.seed} left features {dead} dead (column norm < "
                       f"{cfg.min_column_norm}): a bad target; set target.seed to another value")
    return model.requires_grad_(False)


def load_or_train_tms(cfg: TMSTargetConfig) -> TMSModel:
    """The cached target at cfg.path, trained first (and cached) when missing."""
    return load_or_train_target(cfg, lambda: TMSModel(cfg.n_features, cfg.n_hidden, cfg.n_hidden_layers),
                                lambda: train_tms(cfg), ("n_features", "n_hidden", "n_hidden_layers"))


if __name__ == "__main__":
    target_main(TMSTargetConfig, load_or_train_tms)
