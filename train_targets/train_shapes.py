"""Train a small CNN on generated shapes: one shape (circle, square, triangle) of one colour (red, green,
blue) and one size (small, medium, large) per image, at a random position, predicting all three.

The data is drawn, not downloaded: `shapes_batch(n, generator)` paints n images from a torch generator,
so every batch is a pure function of (seed, step) and needs no network or storage.

The CNN: conv1 (3 -> c1, 4x4, stride 2) -> ReLU -> conv2 (c1 -> c2, 3x3, stride 2) -> ReLU -> conv3
(c2 -> c2, 3x3, stride 2) -> ReLU -> flatten (c2 x 4 x 4) -> fc1 -> ReLU -> fc2 -> logits (batch, 3, 3).
Strides rather than pooling: 16x16, 8x8 and 4x4 output locations, each with its own CI in SPD, a quarter
of what stride 1 and pooling would give (and a quarter of the decomposition's time). Three 3-way heads,
one per attribute (shape, colour, size), rather than one 27-way head. The question
put to SPD is whether the network computes the 9 attribute values or the 27 combinations; a 27-way
head would make every output logit a combination and so build part of the answer into the target.

    python -m train_targets.train_shapes configs/shapes.yaml   # reads the config's `target:` section
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from spd_config import SPDError, option
from spd_run import load_or_train_target, step_generator, target_main

SIDE = 32  # images are SIDE x SIDE RGB
ATTRIBUTES = {"shape": ["circle", "square", "triangle"], "colour": ["red", "green", "blue"],
              "size": ["small", "medium", "large"]}
RADII = (4.0, 7.0, 10.5)  # half-extent in pixels of a small, medium and large shape
COLOURS = torch.eye(3)  # pure red, green, blue


@dataclass
class ShapesTargetConfig:
    noise: float = option(0.05, "std of Gaussian pixel noise added to every image", ge=0)
    c1: int = option(8, "channels of conv1", ge=1)
    c2: int = option(16, "channels of conv2 and conv3", ge=1)
    d_hidden: int = option(32, "width of fc1", ge=1)
    steps: int = option(2000, "training steps", ge=1)
    batch_size: int = option(128, "training batch size", ge=1)
    lr: float = option(3e-3, "AdamW learning rate (cosine decay)", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay", ge=0)
    min_accuracy: float = option(0.95, "held-out accuracy each attribute must reach, else the target is rejected",
                                 ge=0, le=1)
    seed: int = option(0, "training seed (initial weights and data stream)")
    path: str = option("targets/shapes.pt", "where the trained target is cached")


def shapes_batch(n: int, gen: torch.Generator, noise: float = 0.0) -> tuple[Tensor, Tensor]:
    """n images (n, 3, SIDE, SIDE) in [0, 1] plus noise, and their labels (n, 3): shape, colour, size
    indices into ATTRIBUTES. Each shape sits wholly inside the image, centred uniformly at random."""
    labels = torch.randint(3, (n, 3), generator=gen)
    shape, colour, size = labels.unbind(1)
    r = torch.tensor(RADII)[size][:, None, None]  # (n, 1, 1)
    centre = r[:, None] + torch.rand(n, 2, 1, 1, generator=gen) * (SIDE - 1 - 2 * r[:, None])  # (n, 2, 1, 1)
    grid = torch.arange(SIDE, dtype=torch.float32)
    dy, dx = grid[None, :, None] - centre[:, 0], grid[None, None, :] - centre[:, 1]  # (n, SIDE, SIDE)
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = (dx.abs() <= 0.886 * r) & (dy.abs() <= 0.886 * r)  # the area of the circle
    triangle = (dy >= -r) & (dy <= r) & (dx.abs() <= 0.6 * (dy + r))  # apex up, base 2.4 r wide
    inside = torch.stack([circle, square, triangle], 1)[torch.arange(n), shape]  # (n, SIDE, SIDE)
    images = inside[:, None].float() * COLOURS[colour][:, :, None, None]
    if noise:
        images = images + noise * torch.randn(images.shape, generator=gen)
    return images, labels


class ShapesCNN(nn.Module):
    def __init__(self, c1: int, c2: int, d_hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(c2 * (SIDE // 8) ** 2, d_hidden)
        self.fc2 = nn.Linear(d_hidden, 9)

    def forward(self, x: Tensor) -> Tensor:
        """(batch, 3, SIDE, SIDE) -> logits (batch, 3 attributes, 3 values)."""
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.relu(conv(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1)))).view(-1, 3, 3)


@torch.no_grad()
def accuracies(model: nn.Module, x: Tensor, y: Tensor) -> list[float]:
    """Accuracy on each attribute (shape, colour, size)."""
    return (model(x).argmax(-1) == y).float().mean(0).tolist()


def heldout(n: int, noise: float) -> tuple[Tensor, Tensor]:
    """A fixed held-out set (its own seed, apart from every training stream)."""
    return shapes_batch(n, torch.Generator().manual_seed(987_654), noise)


def train_shapes(cfg: ShapesTargetConfig) -> ShapesCNN:
    """Cross-entropy summed over the three heads; reject a target below `min_accuracy` on any attribute."""
    torch.manual_seed(cfg.seed)
    model = ShapesCNN(cfg.c1, cfg.c2, cfg.d_hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    for step in range(cfg.steps):
        x, y = shapes_batch(cfg.batch_size, step_generator(cfg.seed, step), cfg.noise)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    accs = accuracies(model, *heldout(2000, cfg.noise))
    print(f"shapes target trained: loss {loss.item():.3g}, held-out accuracy "
          + ", ".join(f"{a} {acc:.4f}" for a, acc in zip(ATTRIBUTES, accs)))
    if min(accs) < cfg.min_accuracy:
        raise SPDError(f"the target reached held-out accuracies {[round(a, 3) for a in accs]}, below "
                       f"target.min_accuracy = {cfg.min_accuracy}; raise target.steps or change target.lr")
    return model.requires_grad_(False)


def load_or_train_shapes(cfg: ShapesTargetConfig) -> ShapesCNN:
    """The cached target at cfg.path, trained first (and cached) when missing."""
    return load_or_train_target(cfg, lambda: ShapesCNN(cfg.c1, cfg.c2, cfg.d_hidden), lambda: train_shapes(cfg),
                                ("c1", "c2", "d_hidden"))


if __name__ == "__main__":
    target_main(ShapesTargetConfig, load_or_train_shapes)
