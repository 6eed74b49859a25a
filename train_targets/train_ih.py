"""Train a small attention-only transformer on a synthetic induction task.

Each sequence is random tokens in which a pair `A B` occurs once and the last token is `A` again
(A appears nowhere else); the label is `B`. Solving it takes the classic two-layer circuit: a
previous-token head in layer 0 (position of B learns "A was before me") and an induction head in
layer 1 (the final A attends to that B and copies it).

    python -m train_targets.train_ih configs/ih.yaml   # reads the config's `target:` section
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from spd_config import SPDError, option
from spd_run import load_or_train_target, step_generator, target_main


@dataclass
class IHTargetConfig:
    vocab_size: int = option(32, "number of token types", ge=3)
    seq_len: int = option(16, "tokens per sequence, the final A included", ge=4)
    d_model: int = option(64, "residual width", ge=1)
    n_layers: int = option(2, "attention layers", ge=1)
    n_heads: int = option(1, "heads per layer", ge=1)
    use_mlp: bool = option(False, "add a ReLU MLP after each attention layer")
    steps: int = option(3000, "training steps", ge=1)
    batch_size: int = option(256, "training batch size", ge=1)
    lr: float = option(3e-3, "AdamW peak learning rate (cosine decay)", gt=0)
    weight_decay: float = option(0.01, "AdamW weight decay", ge=0)
    min_accuracy: float = option(0.95, "held-out accuracy the target must reach, else it is rejected", ge=0, le=1)
    seed: int = option(0, "seed of the initial weights and the data")
    path: str = option("targets/ih.pt", "where the trained target is cached")


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.v_proj, self.out_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.pattern: Tensor | None = None  # (batch, heads, query, key), kept for the figures

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        self.pattern = pattern.detach()
        return self.out_proj((pattern @ v).transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, use_mlp: bool):
        super().__init__()
        self.attn = Attention(d_model, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.ReLU(), nn.Linear(4 * d_model, d_model)) \
            if use_mlp else None

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x if self.mlp is None else x + self.mlp(x)


class InductionTransformer(nn.Module):
    """tokens (batch, seq) -> logits (batch, seq, vocab); learned positional embedding, no LayerNorm."""

    def __init__(self, cfg: IHTargetConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.use_mlp) for _ in range(cfg.n_layers))
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok_emb(tokens) + self.pos_emb.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


def induction_batch(vocab_size: int, seq_len: int, batch_size: int, seed: int, step: int,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Batch `step` of stream `seed`: tokens (batch, seq), label B (batch,), position of the first A (batch,).

    The first A sits at a random position in [0, seq_len - 3] with B right after it; the last token
    is A again; every other token is drawn uniformly from the vocabulary without A.
    """
    gen = step_generator(seed, step)
    a = torch.randint(vocab_size, (batch_size,), generator=gen)
    # other tokens from vocab \ {A}: draw from vocab_size - 1 values and skip over A
    tokens = torch.randint(vocab_size - 1, (batch_size, seq_len), generator=gen)
    tokens = tokens + (tokens >= a[:, None]).long()
    pos_a = torch.randint(seq_len - 2, (batch_size,), generator=gen)
    rows = torch.arange(batch_size)
    b = tokens[rows, pos_a + 1]  # never A, so the pair is unambiguous
    tokens[rows, pos_a] = a
    tokens[:, -1] = a
    return tokens.to(device), b.to(device), pos_a.to(device)


@torch.no_grad()
def accuracy(model: nn.Module, tokens: Tensor, labels: Tensor) -> float:
    return (model(tokens)[:, -1].argmax(-1) == labels).float().mean().item()


def train_ih(cfg: IHTargetConfig) -> InductionTransformer:
    """Train on the final position's label only; reject a target below min_accuracy on held-out data."""
    torch.manual_seed(cfg.seed)
    model = InductionTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        tokens, labels, _ = induction_batch(cfg.vocab_size, cfg.seq_len, cfg.batch_size, cfg.seed + 1, step)
        loss = F.cross_entropy(model(tokens)[:, -1], labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tokens, labels, _ = induction_batch(cfg.vocab_size, cfg.seq_len, 4096, cfg.seed + 2, 0)
    acc = accuracy(model, tokens, labels)
    print(f"Induction target trained: held-out accuracy {acc:.3f}")
    if acc < cfg.min_accuracy:
        raise SPDError(f"induction target reached accuracy {acc:.3f} < target.min_accuracy {cfg.min_accuracy}; "
                       f"raise target.steps or change target.seed")
    return model


def load_or_train_ih(cfg: IHTargetConfig) -> InductionTransformer:
    """The cached target at cfg.path, trained first (and cached) when missing."""
    return load_or_train_target(cfg, lambda: InductionTransformer(cfg), lambda: train_ih(cfg),
                                ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "use_mlp"))


if __name__ == "__main__":
    target_main(IHTargetConfig, load_or_train_ih)
