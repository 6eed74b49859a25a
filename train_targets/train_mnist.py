"""Train a digit classifier: an MLP, images (flattened) -> fc1 -> ReLU -> fc2 -> ReLU -> fc3 -> 10 logits, or a
small CNN (`target.arch: cnn`), images -> conv1 (3x3) -> ReLU -> conv2 (3x3, stride 2) -> ReLU -> fc1 -> ReLU
-> fc2 -> 10 logits, so that the same example covers linear and convolutional layers.

Data: `digits` is scikit-learn's bundled 8x8 digits (1797 images, no network), split once into a
fixed training and held-out set; any other name is a hub dataset with `image` and `label` columns
and `train` / `test` splits, e.g. `ylecun/mnist` (28x28, needs network the first time).

    python -m train_targets.train_mnist configs/digits.yaml   # reads the config's `target:` section
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from spd_config import SPDError, option
from spd_run import load_or_train_target, step_generator, target_main


@dataclass
class MNISTTargetConfig:
    arch: Literal["mlp", "cnn"] = option("mlp", "the classifier: MLP (fc1, fc2, fc3) or CNN (conv1, conv2, fc1, fc2)")
    dataset: str = option("digits", "'digits' (sklearn's bundled 8x8, offline) or a hub image dataset, e.g. ylecun/mnist")
    image_side: int = option(8, "images are side x side pixels: 8 for digits, 28 for MNIST", ge=1)
    heldout_frac: float = option(0.2, "digits only: fraction held out (hub datasets hold out their test split)", gt=0, le=0.5)
    d_hidden: int = option(64, "width of the hidden layers (the MLP's two, the CNN's fc1)", ge=1)
    channels: int = option(8, "CNN only: channels of conv1 (conv2 has twice as many)", ge=1)
    steps: int = option(3000, "training steps", ge=1)
    batch_size: int = option(128, "training batch size", ge=1)
    lr: float = option(1e-3, "AdamW learning rate (constant)", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay", ge=0)
    min_accuracy: float = option(0.9, "held-out accuracy the target must reach, else it is rejected", ge=0, le=1)
    seed: int = option(0, "training seed (initial weights and batch order; the digits split is fixed)")
    path: str = option("targets/digits.pt", "where the trained target is cached")


@dataclass
class ImageData:
    """Images flattened and scaled to [0, 1]: x_train (N, side^2), y_train (N,), likewise the held-out set."""
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_images(cfg: MNISTTargetConfig) -> ImageData:
    """The training and held-out images of `cfg.dataset`, checked to be image_side x image_side."""
    data = _load(cfg.dataset, cfg.heldout_frac)
    if data.x_train.shape[1] != cfg.image_side ** 2:
        raise SPDError(f"target.dataset = '{cfg.dataset}' has {data.x_train.shape[1]} pixels per image, not "
                       f"target.image_side^2 = {cfg.image_side ** 2}; set target.image_side")
    return data


@functools.lru_cache(maxsize=2)  # one load per process: training the target and the decomposition share it
def _load(dataset: str, heldout_frac: float) -> ImageData:
    if dataset == "digits":
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        d = load_digits()
        x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
        # A fixed permutation (its own seed, not cfg.seed): every target and run sees the same split.
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        n_test = round(heldout_frac * len(y))
        test, train = perm[:n_test], perm[n_test:]
        return ImageData(x[train], y[train], x[test], y[test])
    import datasets

    try:
        ds = datasets.load_dataset(dataset)
    except Exception as e:  # offline, unknown name, ...: one line, not a traceback
        raise SPDError(f"target.dataset = '{dataset}' could not be loaded ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}); use 'digits' offline") from None

    def split(name: str) -> tuple[Tensor, Tensor]:
        images = np.stack([np.asarray(im, dtype=np.float32) for im in ds[name]["image"]])
        return torch.from_numpy(images).flatten(1) / 255, torch.tensor(ds[name]["label"])

    (x_train, y_train), (x_test, y_test) = split("train"), split("test")
    return ImageData(x_train, y_train, x_test, y_test)


class MLPClassifier(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, n_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, d_in) -> logits (batch, n_classes)."""
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNNClassifier(nn.Module):
    def __init__(self, side: int, channels: int, d_hidden: int, n_classes: int = 10):
        super().__init__()
        self.side = side
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(2 * channels * ((side + 1) // 2) ** 2, d_hidden)
        self.fc2 = nn.Linear(d_hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, side^2) flattened images, as the MLP takes them -> logits (batch, n_classes)."""
        h = F.relu(self.conv2(F.relu(self.conv1(x.view(-1, 1, self.side, self.side)))))
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def make_classifier(cfg: MNISTTargetConfig) -> nn.Module:
    """An untrained classifier of the config's architecture."""
    if cfg.arch == "cnn":
        return CNNClassifier(cfg.image_side, cfg.channels, cfg.d_hidden)
    return MLPClassifier(cfg.image_side ** 2, cfg.d_hidden)


def image_batch(x: Tensor, batch_size: int, seed: int, step: int) -> Tensor:
    """Batch number `step` of stream `seed`: rows of x drawn with replacement. Indexed by step, so a
    resumed run sees the same data."""
    gen = step_generator(seed, step)
    return x[torch.randint(len(x), (batch_size,), generator=gen).to(x.device)]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


def train_mnist(cfg: MNISTTargetConfig) -> nn.Module:
    """Train on the training split; reject a target below `min_accuracy` on the held-out split."""
    data = load_images(cfg)
    torch.manual_seed(cfg.seed)
    model = make_classifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(len(data.y_train), (cfg.batch_size,), generator=gen)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    acc = accuracy(model, data.x_test, data.y_test)
    print(f"MNIST target trained on {cfg.dataset}: loss {loss.item():.3g}, train accuracy "
          f"{accuracy(model, data.x_train, data.y_train):.4f}, held-out accuracy {acc:.4f}")
    if acc < cfg.min_accuracy:
        raise SPDError(f"the target reached held-out accuracy {acc:.3f} < target.min_accuracy = {cfg.min_accuracy}; "
                       f"raise target.steps or change target.lr")
    return model.requires_grad_(False)


def load_or_train_mnist(cfg: MNISTTargetConfig) -> nn.Module:
    """The cached target at cfg.path, trained first (and cached) when missing."""
    shape_keys = ("dataset", "image_side", "d_hidden") + (("arch", "channels") if cfg.arch == "cnn" else ())
    return load_or_train_target(cfg, lambda: make_classifier(cfg), lambda: train_mnist(cfg), shape_keys)


if __name__ == "__main__":
    target_main(MNISTTargetConfig, load_or_train_mnist)
