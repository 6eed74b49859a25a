"""What the structure tools (clustering, compare_models, causal) share: their command line, and the alive
subcomponents of a run with their CI on held-out batches.

A subcomponent is named "module:c" (e.g. "layers.0.mlp_in:17") in every JSON file and figure. The scripts
import this module after putting the repository root on sys.path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from spd_common import ComponentModel, Experiment
from spd_config import SPDError


def parser(description: str, runs: list[str]) -> argparse.ArgumentParser:
    """argparse with the positional run dirs `runs`, --out, --n-batches and --min-density; its usage
    errors become one-line SPDErrors (exit 2 through spd_run.run_main)."""
    ap = argparse.ArgumentParser(description=description)
    for run in runs:
        ap.add_argument(run.lower(), metavar=run, help="run dir a decomposition script wrote")
    ap.add_argument("--out", default=None, help=f"output dir (default {runs[0]}/analysis)")
    ap.add_argument("--n-batches", type=int, default=4, help="held-out batches (exp.eval_batch(0..N-1)) to read CI on")
    ap.add_argument("--min-density", type=float, default=1e-3,
                    help="a subcomponent is alive if CI > spd.ci_threshold on at least this fraction of inputs")

    def error(message: str) -> None:
        raise SPDError(f"{message} (usage: {' '.join(ap.format_usage().split()[1:])})")

    ap.error = error  # type: ignore[method-assign]
    return ap


def out_dir(out: str | None, run_dir: str) -> Path:
    path = Path(out) if out is not None else Path(run_dir) / "analysis"
    path.mkdir(parents=True, exist_ok=True)
    return path


@torch.no_grad()
def collect_ci(exp: Experiment, n_batches: int, model: ComponentModel | None = None) -> dict[str, Tensor]:
    """CI of every decomposed module on held-out batches 0..n_batches-1 of `exp`, run through `model`
    (default exp.model; another decomposition of the same target reads the same inputs):
    {name: (N, C)}, N = inputs (batch x seq positions for sequence models; images for a conv: see
    `ComponentModel.per_input`)."""
    model = model or exp.model
    cis = [model.per_input(model.ci_of(exp.input_fn(exp.eval_batch(i)))) for i in range(n_batches)]
    return {n: torch.cat([ci[n].flatten(0, -2) for ci in cis]).cpu() for n in model.names}


def alive(ci: dict[str, Tensor], threshold: float, min_density: float) -> dict[str, Tensor]:
    """{name: indices (K,)} of the subcomponents with CI > threshold on at least min_density of the inputs.
    The floor keeps out subcomponents that fire a handful of times: too few events to say what they do."""
    return {n: ((g > threshold).float().mean(0) >= min_density).nonzero().flatten() for n, g in ci.items()}
