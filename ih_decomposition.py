"""SPD on a two-layer attention-only transformer that solves an induction task.

    python ih_decomposition.py configs/ih.yaml [key.sub=value ...] [--out DIR]

The story:
  1. Load the config; get the target (trained and cached if missing): sequences `... A B ... A`
     whose label is B, solved by a previous-token head in layer 0 and an induction head in layer 1.
  2. Decompose the q, k, v and output projections of every layer with `spd_common.optimize`,
     the output loss being the KL of the final position's next-token distribution.
  3. Evaluate: accuracy of the target, of the model with CI masks, and with each layer's
     components ablated; mean CI of each component at the positions that matter (first A, B,
     final A); and which components carry the mechanism: those whose ablation drops accuracy most,
     in layer 0 (previous-token) and the last layer (induction). Ablating a component here means
     removing U_c V_c from the target's weight for every input (every other mask 1, delta on), not
     masking it with the rest at their CI: CI masks are computed from the target's activations and
     leak them, so a CI-masked model still solves the task with all of layer 0's v_proj ablated.
  4. Figures: attention patterns of the target and of the CI-masked decomposition; CI by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from spd_common import ComponentModel, Experiment, SPDConfig, optimize
from spd_config import config_to_dict, option
from spd_run import figures_dir, get_device, parse_cli, run_main, write_results
from train_targets.train_ih import IHTargetConfig, induction_batch, load_or_train_ih

POSITIONS = ["first A", "B", "other", "final A"]


# COPYING THIS SCRIPT? Change: the config below (keep its `spd: SPDConfig`), the target and data in
# build(), the metrics and the figures. Keep: build's signature and main's skeleton.
@dataclass
class IHConfig:
    target: IHTargetConfig = option(doc="the target model and how to train it")
    spd: SPDConfig = option(doc="the decomposition")
    n_eval: int = option(2048, "held-out sequences for accuracies, ablations and figures", ge=1)


def final_logits(logits: Tensor) -> Tensor:
    """(batch, seq, vocab) -> (batch, vocab): only the final position carries a label."""
    return logits[:, -1]


def layer_of(name: str) -> int:
    return int(name.split(".")[1])  # blocks.<layer>.attn.<proj>


# ------------------------------------------------------------------------------------------------
# Evaluations
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def masked_accuracy(model: ComponentModel, tokens: Tensor, labels: Tensor, masks: dict[str, Tensor],
                    delta_masks: dict[str, Tensor] | None = None) -> float:
    with model.masked(masks, delta_masks):
        return (final_logits(model(tokens)).argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def ci_by_position(ci: dict[str, Tensor], pos_a: Tensor) -> dict[str, Tensor]:
    """Mean CI (4, C) of each module's components at the first A, B, other positions and the final A."""
    B, T = pos_a.shape[0], next(iter(ci.values())).shape[1]
    rows = torch.arange(B)
    other = torch.ones(B, T, dtype=torch.bool, device=pos_a.device)
    other[rows, pos_a] = other[rows, pos_a + 1] = other[:, -1] = False
    return {n: torch.stack([g[rows, pos_a].mean(0), g[rows, pos_a + 1].mean(0), g[other].mean(0), g[:, -1].mean(0)])
            for n, g in ci.items()}


@torch.no_grad()
def ih_metrics(model: ComponentModel, cfg: IHConfig, tokens: Tensor, labels: Tensor, ablate_each: bool) -> dict:
    """Accuracies of the target, CI-masked and per-layer-ablated models; with `ablate_each`, also per
    module and per alive component ablated from the target's weights (one forward pass each, so
    only at the end), and the mechanism's components."""
    ci = model.ci_of(tokens)
    out = {"acc_target": (final_logits(model(tokens)).argmax(-1) == labels).float().mean().item(),
           "acc_ci_masked": masked_accuracy(model, tokens, labels, ci)}
    layers = sorted({layer_of(n) for n in model.names})
    for layer in layers:
        zeros = {n: torch.zeros_like(g) for n, g in ci.items() if layer_of(n) == layer}
        out[f"acc_layer{layer}_ablated"] = masked_accuracy(model, tokens, labels, zeros)
    out["mean_l0"] = sum((g > cfg.spd.ci_threshold).sum(-1).float().mean().item() for g in ci.values()) / len(ci)
    if not ablate_each:
        return out
    # Remove each alive component from the target (all other masks 1, delta on: the target exactly,
    # less U_c V_c) and rank by the accuracy left.
    ones = {n: torch.ones_like(g) for n, g in ci.items()}
    deltas = {n: torch.ones_like(g[..., 0]) for n, g in ci.items()}
    drops = []
    for n, g in ci.items():
        for c in (g > cfg.spd.ci_threshold).flatten(0, -2).any(0).nonzero().flatten().tolist():
            masks = ones | {n: ones[n].clone()}
            masks[n][..., c] = 0
            drops.append((masked_accuracy(model, tokens, labels, masks, deltas), n, c))
    for role, layer in (("prev_token", layers[0]), ("induction", layers[-1])):
        ranked = sorted(d for d in drops if layer_of(d[1]) == layer)
        acc, n, c = ranked[0]
        out[f"top_{role}_component"] = f"{n}:{c}"
        out[f"acc_without_top_{role}_component"] = acc
        # How spread the mechanism is: ablate the layer's components cumulatively, most harmful alone
        # first, until accuracy falls below 50%.
        masks = {m: g.clone() for m, g in ones.items()}
        for k, (_, n, c) in enumerate(ranked, 1):
            masks[n][..., c] = 0
            if masked_accuracy(model, tokens, labels, masks, deltas) < 0.5:
                out[f"n_components_to_break_{role}"] = k
                break
    out["component_ablations"] = [f"{n}:{c} acc={acc:.3f}" for acc, n, c in sorted(drops)[:10]]
    for n, g in ci.items():  # which matrices the mechanisms need: one module's components all ablated
        out[f"acc_module_ablated/{n}"] = masked_accuracy(model, tokens, labels, {n: torch.zeros_like(g)})
    return out


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def plot_attention(model: ComponentModel, tokens: Tensor, pos_a: Tensor, path) -> None:
    """Attention patterns of one sequence: target (top) and CI-masked decomposition (bottom)."""
    x, p = tokens[:1], pos_a[0].item()
    attns = [blk.attn for blk in model.target.blocks]
    model(x)
    target = [a.pattern[0].cpu() for a in attns]
    with model.masked(model.ci_of(x)):
        model(x)
    masked = [a.pattern[0].cpu() for a in attns]
    n_heads = target[0].shape[0]
    fig, axes = plt.subplots(2, len(attns) * n_heads, figsize=(3.2 * len(attns) * n_heads, 6.4), squeeze=False)
    for row, (title, pats) in enumerate((("target", target), ("SPD, CI masks", masked))):
        for layer, pat in enumerate(pats):
            for h in range(n_heads):
                ax = axes[row, layer * n_heads + h]
                ax.imshow(pat[h], vmin=0, vmax=1, cmap="viridis")
                ax.set(title=f"{title}: layer {layer} head {h}", xlabel="key", ylabel="query")
                ax.axvline(p + 1, color="red", lw=0.6)  # B: where the induction head should look
    fig.suptitle(f"first A at {p}, B at {p + 1}, final A at {tokens.shape[1] - 1}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_ci_by_position(by_pos: dict[str, Tensor], threshold: float, path) -> None:
    fig, axes = plt.subplots(1, len(by_pos), figsize=(2.6 * len(by_pos), 3), squeeze=False)
    for ax, (n, m) in zip(axes[0], by_pos.items()):
        alive = (m > threshold).any(0).nonzero().flatten()
        ax.imshow(m[:, alive].cpu(), vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_xticks(range(len(alive)), [str(c) for c in alive.tolist()], fontsize=6)
        ax.set_yticks(range(len(POSITIONS)), POSITIONS, fontsize=7)
        ax.set_title(n.removeprefix("blocks."), fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# KEEP build(cfg: YourConfig) -> Experiment at module level: --resume and the analysis tools import it.
def build(cfg: IHConfig) -> Experiment:
    """The target (trained first if missing) wrapped in fresh components, and its step-indexed data."""
    device, t = get_device(cfg.spd.device), cfg.target

    def tokens(size: int, seed: int, step: int) -> Tensor:
        return induction_batch(t.vocab_size, t.seq_len, size, seed, step, device)[0]

    return Experiment.fresh(load_or_train_ih(t).to(device), cfg.spd, tokens, output_fn=final_logits)


# KEEP main's skeleton: parse_cli, build, optimize, figures, write_results (last line), run_main.
def main() -> None:
    cfg, run_dir = parse_cli(IHConfig, __doc__.splitlines()[0])
    exp = build(cfg)
    model, t = exp.model, cfg.target
    tokens, labels, pos_a = induction_batch(t.vocab_size, t.seq_len, cfg.n_eval, cfg.spd.seed + 20_000, 0,
                                            get_device(cfg.spd.device))

    results = optimize(model, cfg.spd, exp.train_batch, exp.eval_batch, run_dir, output_fn=final_logits,
                       eval_fn=lambda m: ih_metrics(m, cfg, tokens, labels, ablate_each=False),
                       full_config=config_to_dict(cfg))
    if results is None:  # a torchrun rank > 0: rank 0 alone evaluates, plots and writes the results
        return
    results |= ih_metrics(model, cfg, tokens, labels, ablate_each=True)

    figures = figures_dir(run_dir)
    plot_attention(model, tokens, pos_a, figures / "attention_patterns.png")
    plot_ci_by_position(ci_by_position(model.ci_of(tokens), pos_a), cfg.spd.ci_threshold,
                        figures / "ci_by_position.png")

    print(f"accuracy: target {results['acc_target']:.3f}, CI-masked {results['acc_ci_masked']:.3f}, "
          + ", ".join(f"{k.removeprefix('acc_')} {v:.3f}" for k, v in results.items() if k.endswith("_ablated"))
          + f"; mean L0 {results['mean_l0']:.2f}")
    for role in ("prev_token", "induction"):
        print(f"top {role} component {results[f'top_{role}_component']}: accuracy without it "
              f"{results[f'acc_without_top_{role}_component']:.3f}; components to remove for accuracy < 0.5: "
              f"{results.get(f'n_components_to_break_{role}', 'more than all alive')}")
    print(f"{results['steps']} steps in {results['wall_s']} s ({results['steps_per_s']} steps/s), "
          f"peak RSS {results['peak_rss_mb']} MB")
    write_results(run_dir, results)


if __name__ == "__main__":
    run_main(main)
