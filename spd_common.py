"""Generic Stochastic Parameter Decomposition (SPD) machinery shared by every experiment script.

Sections, in reading order:
  1. The SPD config, run directories, torchrun (typed YAML loading itself is in spd_config.py).
  2. Components: rank-one factors U, V standing in for a target module's weight.
  3. Causal-importance (CI) functions and leaky hard sigmoids.
  4. ComponentModel: attaches components to an unmodified target model by module-name pattern.
  5. Masks and losses.
  6. Evaluation metrics.
  7. The `optimize` loop: schedules, logging, checkpoints.

Shapes: `...` is any batch shape (batch, or batch x seq); C is the number of subcomponents of a
module; a module's weight is seen as a (d_out, d_in) matrix W, approximated by U (d_out, C) @ V (C, d_in).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fnmatch
import functools
import hashlib
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import Tensor
from tqdm import tqdm

from spd_config import F_, SPDError, config_to_dict, load_config  # noqa: F401 (re-exported for the scripts)


# ================================================================================================
# 1. The SPD config, run directories, torchrun
# ================================================================================================
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped by SIGTERM/SIGUSR1 with a checkpoint saved; --resume


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived and `optimize` saved a checkpoint; `run_main` exits with EXIT_PREEMPTED."""


@dataclass
class SPDConfig:
    """Everything generic about one decomposition; experiment configs hold one under `spd:`."""

    modules: dict[str, int] = F_({}, "module-name pattern (fnmatch) -> C, subcomponents per matched module")
    tied: dict[str, str] = F_({}, "module -> module whose components it reuses transposed (TMS decoder)")
    ci_fn: Literal["mlp", "vector_mlp", "shared_mlp"] = F_("mlp", "CI function type")
    ci_hidden: list[int] = F_([16], "hidden widths of the CI MLPs")
    sampling: Literal["continuous", "binomial"] = F_("continuous", "mask noise r ~ U(0,1) or {0,1}")
    n_mask_samples: int = F_(1, "stochastic mask samples S per step", ge=1)
    use_delta_component: bool = F_(True, "add W - UV as one extra stochastically masked component")
    faithfulness_warmup_steps: int = F_(0, "steps fitting UV to W before training", ge=0)
    faithfulness_warmup_lr: float = F_(0.01, "learning rate of the faithfulness warm-up", gt=0)
    faithfulness_warmup_weight_decay: float = F_(0.1, "AdamW weight decay of the warm-up", ge=0)
    faithfulness_coeff: Optional[float] = F_(None, "weight of ||W - UV||^2 (null = not computed)", ge=0)
    stochastic_recon_coeff: Optional[float] = F_(1.0, "weight of the all-layers stochastic recon loss", ge=0)
    stochastic_recon_layerwise_coeff: Optional[float] = F_(1.0, "weight of the one-layer-at-a-time recon loss", ge=0)
    ci_masked_recon_coeff: Optional[float] = F_(None, "weight of the recon loss with masks = CI", ge=0)
    importance_minimality_coeff: Optional[float] = F_(3e-3, "weight of sum_c |g_c|^p", ge=0)
    p: float = F_(1.0, "exponent p of the importance-minimality loss", gt=0)
    p_anneal_final: Optional[float] = F_(None, "anneal p linearly to this value (null = no annealing)", gt=0)
    p_anneal_start_frac: float = F_(0.0, "fraction of training where p annealing starts", ge=0, le=1)
    p_anneal_end_frac: float = F_(1.0, "fraction of training where p annealing ends", ge=0, le=1)
    output_loss: Literal["mse", "kl"] = F_("mse", "output distance: MSE (toys) or KL of next-token dists (LMs)")
    optimizer: Literal["adam", "adamw"] = F_("adam", "optimizer")
    lr: float = F_(1e-3, "peak learning rate", gt=0)
    weight_decay: float = F_(0.0, "AdamW weight decay", ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = F_("cosine", "decay after warm-up (to 0)")
    lr_warmup_frac: float = F_(0.0, "fraction of steps with linear lr warm-up", ge=0, le=1)
    grad_clip: Optional[float] = F_(None, "clip the global grad norm to this (null = off)", gt=0)
    steps: int = F_(10_000, "optimisation steps", ge=1)
    batch_size: int = F_(4096, "examples per step", ge=1)
    eval_every: int = F_(1000, "evaluate every N steps (and at the end)", ge=1)
    eval_batch_size: int = F_(4096, "examples per evaluation batch", ge=1)
    grad_accum_steps: int = F_(1, "split each step's batch into this many micro-batches (same result, less memory)", ge=1)
    autocast_bf16: bool = F_(False, "run forward passes under bf16 autocast (meant for CUDA; works but is slow on CPU)")
    compile: bool = F_(False, "torch.compile the target model (the forward every loss runs through)")
    log_every: int = F_(100, "write training losses to metrics.jsonl every N steps", ge=1)
    ci_threshold: float = F_(0.1, "CI above this counts a subcomponent as active (L0, alive)", ge=0, le=1)
    checkpoint_every: Optional[int] = F_(1000, "save a checkpoint every N steps, for --resume (null = none)", ge=1)
    keep_checkpoints: int = F_(3, "keep the newest N periodic checkpoints (final.pt is always kept)", ge=1)
    on_nan: Literal["stop", "skip"] = F_("stop", "a nan/inf loss or gradient stops the run, or skips that step")
    seed: int = F_(0, "seed of parameters, data and masks")
    device: str = F_("auto", "'auto' (cuda if available), 'cpu' or 'cuda[:i]'")
    wandb_project: Optional[str] = F_(None, "log to this wandb project (null = no wandb)")

    def __post_init__(self) -> None:
        """Checks that involve more than one field (single-field bounds are in the metadata)."""
        if self.p_anneal_start_frac > self.p_anneal_end_frac:
            raise SPDError(f"p_anneal_start_frac = {self.p_anneal_start_frac} must be <= p_anneal_end_frac = "
                           f"{self.p_anneal_end_frac}")
        coeffs = [f.name for f in dataclasses.fields(self) if f.name.endswith("_coeff")]
        if not any(getattr(self, c) for c in coeffs):
            raise SPDError(f"no loss term is on: set at least one of {', '.join(coeffs)} to a positive value")


EXPERIMENT_SCRIPTS = {"tms": "tms_decomposition.py", "resid_mlp": "resid_mlp_decomposition.py",
                      "ih": "ih_decomposition.py"}


def script_for(config: str | Path) -> str:
    """The experiment script that runs a config, by the config's file name: tms_* -> tms_decomposition.py,
    resid_mlp* -> resid_mlp_decomposition.py, ih* -> ih_decomposition.py, anything else -> lm_decomposition.py."""
    for prefix, script in EXPERIMENT_SCRIPTS.items():
        if Path(config).stem.startswith(prefix):
            return script
    return "lm_decomposition.py"


def make_run_dir(config_path: Path, out: str | None) -> Path:
    """`out` if given (absent, empty, or holding only the config.yaml of a run that failed before it
    started), else runs/<config name>/<timestamp>; never overwrites results."""
    if out is not None:
        run_dir = Path(out)
        if run_dir.exists() and not run_dir.is_dir():
            raise SPDError(f"--out {run_dir} is a file, not a directory; choose another --out")
        if run_dir.exists() and any(p.name != "config.yaml" for p in run_dir.iterdir()):
            raise SPDError(f"output dir {run_dir} already holds files; choose another --out, remove it, "
                           f"or continue it with --resume {run_dir}")
    else:
        base = Path("runs") / config_path.stem / datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir, i = base, 1
        while run_dir.exists():
            run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_resumable(run_dir: Path) -> None:
    """A run dir that `optimize` can continue: its config.yaml, a checkpoint, and no results.json yet."""
    if not run_dir.is_dir():
        raise SPDError(f"--resume {run_dir}: no such directory; pass the run dir of an interrupted run")
    if not (run_dir / "config.yaml").is_file():
        raise SPDError(f"--resume {run_dir}: no config.yaml there, so it is not a run dir; pass the directory "
                       f"that holds the run's config.yaml, metrics.jsonl and checkpoints/")
    if (run_dir / "results.json").exists():
        raise SPDError(f"--resume {run_dir}: the run already finished (results.json exists); nothing to resume")
    ckpts = run_dir / "checkpoints"
    if not (list(ckpts.glob("step_*.pt")) or (ckpts / "final.pt").exists()):
        raise SPDError(f"--resume {run_dir}: no checkpoint to resume from (the run stopped before its first; "
                       f"spd.checkpoint_every sets how often); start the run again")


def parse_cli(cls: type, description: str, argv: list[str] | None = None) -> tuple[Any, Path]:
    """`script.py CONFIG.yaml [key.sub=value ...] [--out DIR]` -> (typed config, fresh run dir), or
    `script.py --resume RUN_DIR` -> (the run's own config.yaml, RUN_DIR), which `optimize` continues."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("config", nargs="?", help="YAML config, e.g. configs/tms_5-2.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, typed by the config")
    ap.add_argument("--out", default=None, help="run directory (default runs/<config name>/<timestamp>)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its latest checkpoint")

    def error(message: str) -> None:  # argparse's own errors: one line too, not usage + error
        raise SPDError(f"{message} (usage: {' '.join(ap.format_usage().split()[1:])})")

    ap.error = error  # type: ignore[method-assign]
    args = ap.parse_args(argv)
    ddp = init_distributed()
    if not ddp.is_main:  # rank 0 validates and makes the run dir; the others are told its path or error
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0].startswith("error: "):
            raise SPDError(message[0].removeprefix("error: "))
        return load_config(cls, Path(message[0]) / "config.yaml"), Path(message[0])
    try:
        cfg, run_dir = _config_and_run_dir(cls, args, error)
    except SPDError as e:
        if ddp.world_size > 1:
            dist.broadcast_object_list([f"error: {e}"], src=0)
        raise
    if ddp.world_size > 1:
        dist.broadcast_object_list([str(run_dir)], src=0)
    return cfg, run_dir


def _config_and_run_dir(cls: type, args: argparse.Namespace, error: Callable[[str], None]) -> tuple[Any, Path]:
    """The config and run dir of a new run (made here) or of the run being resumed."""
    if args.resume is not None:
        if args.config or args.overrides or args.out:
            raise SPDError(f"--resume {args.resume} continues the run with its own config.yaml; drop CONFIG, "
                           f"overrides and --out (edit {Path(args.resume) / 'config.yaml'} to change it)")
        run_dir = Path(args.resume)
        check_resumable(run_dir)
        return load_config(cls, run_dir / "config.yaml"), run_dir
    if args.config is None:
        error("no config given: pass CONFIG.yaml (e.g. configs/tms_5-2.yaml) or --resume RUN_DIR")
    cfg = load_config(cls, args.config, args.overrides)
    run_dir = make_run_dir(Path(args.config), args.out)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return cfg, run_dir


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main; a user-facing error becomes one line on stderr and exit code 2, a
    preemption one line and EXIT_PREEMPTED."""
    try:
        main()
    except SPDError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job; rank 0 of 1 without torchrun."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, x: Tensor) -> Tensor:
        """This rank's equal share of the rows of a global batch."""
        if x.shape[0] % self.world_size:
            raise SPDError(f"a batch of {x.shape[0]} does not split over {self.world_size} processes; "
                           f"make spd.batch_size and spd.eval_batch_size multiples of the process count")
        n = x.shape[0] // self.world_size
        return x[self.rank * n: (self.rank + 1) * n]

    def mean(self, values: Tensor) -> Tensor:
        """Average over ranks (a no-op on one process)."""
        if self.world_size > 1:
            dist.all_reduce(values)
            values = values / self.world_size
        return values


def init_distributed() -> Dist:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # so that device "cuda" is this rank's GPU
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world_size)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SPDError(f"spd.device = '{name}' is not a device; use auto, cpu or cuda[:i]") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SPDError(f"spd.device = '{name}' but this machine has {torch.cuda.device_count()} CUDA device(s); "
                       f"set spd.device=auto or cpu")
    return device


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_results(run_dir: Path, results: dict) -> Path:
    """Write results.json and print its path as the script's last line."""
    path = run_dir / "results.json"
    path.write_text(json.dumps(results, indent=2))
    print(path)
    return path


def target_main(cfg_cls: type, load_or_train: Callable[[Any], Any]) -> None:
    """`python -m train_targets.<name> CONFIG.yaml`: build (or find cached) the target that the
    decomposition config's `target:` section describes, and print where it is."""
    def main() -> None:
        if len(sys.argv) != 2:
            raise SPDError(f"usage: python -m train_targets.{Path(sys.argv[0]).stem} CONFIG.yaml")
        cfg = load_config(cfg_cls, sys.argv[1], section="target")
        load_or_train(cfg)
        print(cfg.path)

    run_main(main)


def load_or_train_target(cfg: Any, build: Callable[[], nn.Module], train: Callable[[], nn.Module],
                         shape_keys: tuple[str, ...]) -> nn.Module:
    """The frozen target cached at `cfg.path`; trained with `train()` (and cached) when missing.

    The cache stores the target config it was trained with; one whose `shape_keys` differ from
    `cfg` is refused rather than silently loaded into a model of another shape, and one trained
    with other settings (steps, weight decay, ...) is used with a note saying so.
    """
    path = Path(cfg.path)
    if not path.exists():
        print(f"Target {path} not found: training it ({cfg.steps} steps) and caching it there.")
        model = train()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"config": dataclasses.asdict(cfg), "state_dict": model.state_dict()}, tmp)
        os.replace(tmp, path)  # atomic: an interrupted save never leaves a truncated cache
        return model.requires_grad_(False)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved_cfg, state = saved["config"], saved["state_dict"]
    except Exception as e:  # truncated file, not a checkpoint, ...
        raise SPDError(f"target checkpoint {path} is unreadable ({type(e).__name__}); delete it to retrain") from None
    if any(saved_cfg.get(k) != getattr(cfg, k) for k in shape_keys):
        raise SPDError(f"target checkpoint {path} has shape {[saved_cfg.get(k) for k in shape_keys]} but the config "
                       f"asks for {[getattr(cfg, k) for k in shape_keys]} ({', '.join(shape_keys)}); "
                       f"set target.path to a new file or delete {path}")
    trained_with = {k: v for k, v in saved_cfg.items() if k != "path" and getattr(cfg, k, v) != v}
    if trained_with:
        print(f"Note: target {path} was trained with {trained_with}, not this config's values; using it "
              f"(delete it to retrain)")
    model = build()
    model.load_state_dict(state)
    return model.requires_grad_(False)


# ================================================================================================
# 2. Components
# ================================================================================================
class Components(nn.Module):
    """C rank-one subcomponents of one weight matrix W (d_out, d_in): W ≈ U @ V.

    `tied_to` makes these the transposes of another module's components (U = V_src^T, V = U_src^T),
    sharing parameters; such a module has no parameters of its own.
    """

    def __init__(self, d_in: int, d_out: int, C: int, tied_to: Components | None = None):
        super().__init__()
        self.d_in, self.d_out, self.C = d_in, d_out, C
        self._tied_to = [tied_to] if tied_to is not None else []  # a list hides it from nn.Module
        if tied_to is None:
            # Unit-variance inner acts and an initial UV of the same scale as a unit-norm W.
            self.V = nn.Parameter(torch.randn(C, d_in) / math.sqrt(d_in))
            self.U = nn.Parameter(torch.randn(d_out, C) / math.sqrt(C))

    @property
    def tied(self) -> bool:
        return bool(self._tied_to)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(U (d_out, C), V (C, d_in))."""
        if self._tied_to:
            src = self._tied_to[0]
            return src.V.T, src.U.T
        return self.U, self.V

    def weight(self) -> Tensor:
        """UV (d_out, d_in)."""
        U, V = self.factors()
        return U @ V


def decomposable_types() -> tuple[type, ...]:
    """Layer types that can be decomposed: nn.Linear, nn.Embedding and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D  # imported here: transformers is slow to import

    return nn.Linear, nn.Embedding, Conv1D


def weight_out_in(module: nn.Module) -> Tensor:
    """A decomposable layer's weight as (d_out, d_in). nn.Linear stores it so; nn.Embedding stores
    (vocab, d) = (d_in, d_out) for one-hot inputs, and Conv1D (d_in, d_out) (it computes x @ W + b)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


class DecomposedModule(nn.Module):
    """Stands in for a target `nn.Linear`, `nn.Embedding` or `Conv1D` inside the target model.

    With no mask set it runs the original module. With a mask (..., C) it runs the masked
    components instead: `((a V^T) * m) U^T (+ delta_mask * a (W - UV)^T) + bias`.
    """

    def __init__(self, original: nn.Module, components: Components):
        super().__init__()
        self.original = original
        self._components = [components]
        self.is_embedding = isinstance(original, nn.Embedding)
        self.mask: Tensor | None = None
        self.delta_mask: Tensor | None = None
        self.inner: Tensor | None = None  # inner acts of the target's input here, when the caller has them
        self.cache_input = False
        self.last_input: Tensor | None = None

    @property
    def components(self) -> Components:
        return self._components[0]

    def target_weight(self) -> Tensor:
        """The frozen target weight as a (d_out, d_in) matrix."""
        return weight_out_in(self.original)

    def inner_acts(self, x: Tensor) -> Tensor:
        """h_c = V[c] · a: (..., C). For an embedding `a` is the one-hot token, so h = V[:, token]."""
        _, V = self.components.factors()
        return F.embedding(x, V.T) if self.is_embedding else x @ V.T

    def _masked_forward(self, x: Tensor, mask: Tensor, delta_mask: Tensor | None) -> Tensor:
        U, V = self.components.factors()
        out = ((self.inner if self.inner is not None else self.inner_acts(x)) * mask) @ U.T
        if delta_mask is not None:
            delta = self.target_weight() - U @ V
            delta_out = F.embedding(x, delta.T) if self.is_embedding else x @ delta.T
            out = out + delta_mask.unsqueeze(-1) * delta_out
        bias = getattr(self.original, "bias", None)
        return out if bias is None else out + bias

    def forward(self, x: Tensor) -> Tensor:
        if self.cache_input:
            self.last_input = x
        if self.mask is None:
            return self.original(x)
        return self._masked_forward(x, self.mask, self.delta_mask)


# ================================================================================================
# 3. Causal-importance functions
# ================================================================================================
# The leaky hard sigmoids as autograd Functions: the same values and gradients, to the bit, as
# where(x < 0, slope x, min(x, 1)) and where(x > 1, 1 + slope (x - 1), max(x, 0)) under autograd, in
# fewer passes (autograd's backward of where/clamp takes ~6 ops; these take 2).
class _LowerLeakyHardSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, slope: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.slope = slope
        return F.leaky_relu(x, slope).clamp(max=1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return g * torch.where(x < 0, ctx.slope, (x <= 1).to(g.dtype)), None


class _UpperLeakyHardSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, slope: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.slope = slope
        return torch.where(x > 1, 1 + slope * (x - 1), x.clamp(min=0.0))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return g * torch.where(x > 1, ctx.slope, (x >= 0).to(g.dtype)), None


def lower_leaky_hard_sigmoid(x: Tensor, slope: float = 0.01) -> Tensor:
    """0.01x below 0, x on [0, 1], 1 above (no gradient). Feeds the masks."""
    return _LowerLeakyHardSigmoid.apply(x, slope)


def upper_leaky_hard_sigmoid(x: Tensor, slope: float = 0.01) -> Tensor:
    """0 below 0 (no gradient), x on [0, 1], 1 + 0.01(x - 1) above. Feeds importance minimality."""
    return _UpperLeakyHardSigmoid.apply(x, slope)


def _init_stack(C: int | None, widths: list[int]) -> nn.ParameterList:
    """Weights (C, w_in, w_out) and biases (C, 1, w_out) (no C axis when C is None), He-initialised."""
    params = nn.ParameterList()
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        gain = 1.0 if i == len(widths) - 2 else 2.0  # GELU hidden layers, linear output
        lead = () if C is None else (C,)
        params.append(nn.Parameter(torch.randn(*lead, w_in, w_out) * math.sqrt(gain / w_in)))
        params.append(nn.Parameter(torch.zeros(*lead, 1, w_out)))
    return params


def _per_component_mlp(x: Tensor, layers: nn.ParameterList, start: int = 0) -> Tensor:
    """C independent MLPs as batched matmuls: x (C, N, d) -> (C, N, 1), from layer `start` on.

    baddbmm keeps both passes as single BLAS calls per layer, and its output is contiguous (GELU
    on a strided (C, N, H) view is ~10x slower); GELU is the only elementwise work.
    """
    for i in range(start, len(layers), 2):
        x = torch.baddbmm(layers[i + 1], x, layers[i])
        if i < len(layers) - 2:
            x = F.gelu(x)
    return x


# The default CI function, C scalar MLPs 1 -> H (GELU) -> 1 on a (batch, C) tensor, costs most of a TMS
# step when run as batched matmuls: inner widths 1 and H are elementwise work done badly by BLAS, and
# GELU's erf and exp over the (batch, C, H) hidden layer dominate what is left. On CPU a small C kernel
# (compiled once with the system's C compiler and cached; about 6x faster at 1 thread) does forward
# and backward in one pass each, recomputing the hidden layer in the backward instead of storing it,
# with rational/polynomial erf and exp accurate to a few float32 ulp. Elsewhere (GPU, float64, no
# compiler, SPD_CI_KERNEL=0) the same function runs as broadcast torch ops.
_CI_KERNEL_SRC = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
/* erf: Eigen's/XLA's float rational approximation on [-4, 4] (+-1 outside), a few ulp. */
static inline float erf_(float x) {
    x = x < -4.0f ? -4.0f : x; x = x > 4.0f ? 4.0f : x;
    float x2 = x * x;
    float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
    p = x2 * p + -2.10102402082508e-06f;
    p = x2 * p + -5.69250639462346e-05f;
    p = x2 * p + -7.34990630326855e-04f;
    p = x2 * p + -2.95459980854025e-03f;
    p = x2 * p + -1.60960333262415e-02f;
    float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
    q = x2 * q + -1.68282697438203e-03f;
    q = x2 * q + -7.37332916720468e-03f;
    q = x2 * q + -1.42647390514189e-02f;
    return x * p / q;
}
/* exp for x <= 0 (Cephes expf: range reduction to [-ln2/2, ln2/2], degree-5 polynomial). */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return y * scale;
}
#define SQRT1_2 0.70710678118654752f
#define INV_SQRT_2PI 0.39894228040143268f

/* h (C, N) -> out (C, N): out[c] = b2[c] + sum_k w2[c,k] gelu(h[c] w1[c,k] + b1[c,k]). */
void ci_forward(const float *h, int C, int N, int H, const float *w1, const float *b1, const float *w2,
                const float *b2, float *out) {
    for (int c = 0; c < C; c++) {
        const float *hc = h + (long)c * N;
        float *oc = out + (long)c * N;
        for (int n = 0; n < N; n++) oc[n] = b2[c];
        for (int k = 0; k < H; k++) {
            const float a = w1[c * H + k], b = b1[c * H + k], w = w2[c * H + k];
#pragma omp simd
            for (int n = 0; n < N; n++) {
                float p = hc[n] * a + b;
                oc[n] += w * (p * (0.5f + 0.5f * erf_(p * SQRT1_2)));
            }
        }
    }
}

/* Given g = dL/dout (C, N): dh (C, N), dw1, db1, dw2 (C, H), db2 (C). Recomputes the hidden layer. */
void ci_backward(const float *h, const float *g, int C, int N, int H, const float *w1, const float *b1,
                 const float *w2, float *dh, float *dw1, float *db1, float *dw2, float *db2) {
    for (int c = 0; c < C; c++) {
        const float *hc = h + (long)c * N, *gc = g + (long)c * N;
        float *dhc = dh + (long)c * N;
        float sg = 0.0f;
#pragma omp simd reduction(+:sg)
        for (int n = 0; n < N; n++) { dhc[n] = 0.0f; sg += gc[n]; }
        db2[c] = sg;
        for (int k = 0; k < H; k++) {
            const float a = w1[c * H + k], b = b1[c * H + k], w = w2[c * H + k];
            float s_w1 = 0.0f, s_b1 = 0.0f, s_w2 = 0.0f;
#pragma omp simd reduction(+:s_w1, s_b1, s_w2)
            for (int n = 0; n < N; n++) {
                float p = hc[n] * a + b;
                float cdf = 0.5f + 0.5f * erf_(p * SQRT1_2);
                float pdf = INV_SQRT_2PI * exp_neg(-0.5f * p * p);
                float dpre = gc[n] * w * (cdf + p * pdf);
                dhc[n] += dpre * a;
                s_w1 += dpre * hc[n];
                s_b1 += dpre;
                s_w2 += gc[n] * p * cdf;
            }
            dw1[c * H + k] = s_w1;
            db1[c * H + k] = s_b1;
            dw2[c * H + k] = s_w2;
        }
    }
}
"""


@functools.cache
def _ci_kernel() -> ctypes.CDLL | None:
    """The compiled CI kernel, or None (SPD_CI_KERNEL=0, no C compiler, or it failed: one warning)."""
    if os.environ.get("SPD_CI_KERNEL", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    key = hashlib.sha256("\0".join([_CI_KERNEL_SRC, cc, *flags, platform.machine()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SPD_CACHE_DIR", Path.home() / ".cache" / "spd"))
    lib_path = cache / f"ci_kernel_{key}.so"
    try:
        if not lib_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # compile beside the cache, then rename
                src, out = Path(tmp) / "ci_kernel.c", Path(tmp) / "ci_kernel.so"
                src.write_text(_CI_KERNEL_SRC)
                subprocess.run([cc, *flags, "-o", str(out), str(src), "-lm"], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(out, lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or e
        warnings.warn(f"the CI kernel did not build ({' '.join(str(detail).split())[:200]}); using torch ops "
                      f"(slower; set SPD_CI_KERNEL=0 to skip trying)")
        return None
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.ci_forward.argtypes = [ptr, i32, i32, i32, ptr, ptr, ptr, ptr, ptr]
    lib.ci_backward.argtypes = [ptr, ptr, i32, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    return lib


def _use_ci_kernel(*tensors: Tensor) -> bool:
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and tensors[0].shape[0] < 2 ** 31 and _ci_kernel() is not None)


class _ScalarGeluMLP(torch.autograd.Function):
    """C independent MLPs 1 -> H (GELU) -> 1, one per column of h (N, C) -> (N, C). Weights w1, b1,
    w2 as (C, H), b2 as (C,): views of the stored parameters. The C kernel above on CPU; else the
    (N, C, H) hidden layer is one broadcast addcmul, and the backward reuses the forward's
    pre-activations and activations instead of autograd's per-op backward."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        w1, b1, w2, b2 = (t.contiguous() for t in (w1, b1, w2, b2))
        ctx.kernel = _use_ci_kernel(h, w1, b1, w2, b2)
        if ctx.kernel:
            (C, N), H = h.T.shape, w1.shape[1]
            hT = h.T.contiguous()  # (C, N): the kernel runs along N, contiguous for SIMD
            out = torch.empty(C, N)
            _ci_kernel().ci_forward(hT.data_ptr(), C, N, H, w1.data_ptr(), b1.data_ptr(), w2.data_ptr(),
                                    b2.data_ptr(), out.data_ptr())
            ctx.save_for_backward(hT, w1, b1, w2)
            return out.T.contiguous()
        pre = torch.addcmul(b1, h.unsqueeze(-1), w1)  # (N, C, H)
        act = F.gelu(pre)
        ctx.save_for_backward(h, w1, w2, pre, act)
        return (act * w2).sum(-1).add_(b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, ...]:
        if ctx.kernel:
            hT, w1, b1, w2 = ctx.saved_tensors
            (C, N), H = hT.shape, w1.shape[1]
            gT = g.T.contiguous().float()
            dh, dw1, db1, dw2, db2 = (torch.empty(C, N), torch.empty(C, H), torch.empty(C, H), torch.empty(C, H),
                                      torch.empty(C))
            _ci_kernel().ci_backward(hT.data_ptr(), gT.data_ptr(), C, N, H, w1.data_ptr(), b1.data_ptr(),
                                     w2.data_ptr(), dh.data_ptr(), dw1.data_ptr(), db1.data_ptr(), dw2.data_ptr(),
                                     db2.data_ptr())
            return dh.T, dw1, db1, dw2, db2
        h, w1, w2, pre, act = ctx.saved_tensors
        g3 = g.unsqueeze(-1)
        dpre = torch.ops.aten.gelu_backward(g3 * w2, pre)  # (N, C, H)
        return (dpre * w1).sum(-1), (dpre * h.unsqueeze(-1)).sum(0), dpre.sum(0), (act * g3).sum(0), g.sum(0)


class ScalarMLPs(nn.Module):
    """`mlp`: each subcomponent c has its own MLP 1 -> hidden -> 1 reading its own h_c. (..., C) -> (..., C)."""

    def __init__(self, C: int, hidden: list[int]):
        super().__init__()
        self.layers = _init_stack(C, [1, *hidden, 1])

    def forward(self, h: Tensor) -> Tensor:
        C = h.shape[-1]
        if len(self.layers) == 4:  # one hidden layer (the default): fused elementwise
            w1, b1, w2, b2 = self.layers
            H = w1.shape[-1]
            out = _ScalarGeluMLP.apply(h.reshape(-1, C), w1.view(C, H), b1.view(C, H), w2.view(C, H), b2.view(C))
            return out.view(h.shape)
        x = h.reshape(-1, C).T.unsqueeze(-1)  # (C, N, 1)
        return _per_component_mlp(x, self.layers)[..., 0].T.reshape(h.shape)


class VectorMLPs(nn.Module):
    """`vector_mlp`: each subcomponent has its own MLP d_in -> hidden -> 1 reading the whole input."""

    def __init__(self, C: int, d_in: int, hidden: list[int]):
        super().__init__()
        self.C = C
        self.layers = _init_stack(C, [d_in, *hidden, 1])

    def forward(self, a: Tensor) -> Tensor:
        a2 = a.reshape(-1, a.shape[-1])  # (N, d_in), shared by all C MLPs without a copy
        x = _per_component_mlp(a2.expand(self.C, *a2.shape), self.layers)  # (C, N, 1)
        return x[..., 0].T.reshape(*a.shape[:-1], self.C)


class SharedMLP(nn.Module):
    """`shared_mlp`: one MLP per module mapping the input d_in -> hidden -> C."""

    def __init__(self, C: int, d_in: int, hidden: list[int]):
        super().__init__()
        self.layers = _init_stack(None, [d_in, *hidden, C])

    def forward(self, a: Tensor) -> Tensor:
        x = a
        for i in range(0, len(self.layers), 2):
            x = x @ self.layers[i] + self.layers[i + 1][0]
            if i < len(self.layers) - 2:
                x = F.gelu(x)
        return x


def make_ci_fn(kind: str, C: int, d_in: int, hidden: list[int]) -> nn.Module:
    if kind == "mlp":
        return ScalarMLPs(C, hidden)
    if kind == "vector_mlp":
        return VectorMLPs(C, d_in, hidden)
    return SharedMLP(C, d_in, hidden)


# ================================================================================================
# 4. ComponentModel
# ================================================================================================
def _key(name: str) -> str:
    return name.replace(".", "-")  # ModuleDict keys may not contain dots


class ComponentModel(nn.Module):
    """A frozen target model with some modules decomposed into components, each with a CI function.

    `patterns` maps fnmatch patterns over module names to C. The target's code is untouched: each
    matched module is swapped for a `DecomposedModule` that runs the original unless masks are set.
    """

    def __init__(self, target: nn.Module, patterns: dict[str, int], tied: dict[str, str],
                 ci_fn: str, ci_hidden: list[int]):
        super().__init__()
        target.requires_grad_(False)
        target.eval()
        self.target = target
        found = {n: m for n, m in target.named_modules() if isinstance(m, decomposable_types())}
        if not patterns:
            raise SPDError(f"no modules to decompose: set spd.modules, e.g. {{{next(iter(found), 'fc1')}: 20}}")
        self.C: dict[str, int] = {}
        for pattern, C in patterns.items():
            matches = [n for n in found if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                raise SPDError(f"module pattern '{pattern}' matches no nn.Linear/nn.Embedding/Conv1D of the target; "
                               f"its modules are: {', '.join(found) or '(none)'}")
            for n in matches:
                self.C.setdefault(n, C)
        for name, src in tied.items():
            for n in (name, src):
                if n not in self.C:
                    raise SPDError(f"tied module '{n}' is not among the decomposed modules {list(self.C)}")
            if self.C[name] != self.C[src]:
                raise SPDError(f"tied modules '{name}' and '{src}' need the same C")
        self.ci_reads_inner_acts = ci_fn == "mlp"
        self.components = nn.ModuleDict()
        self.ci_fns = nn.ModuleDict()
        self.modules_: dict[str, DecomposedModule] = {}
        # Sources before the modules tied to them, so that their components exist.
        for name in [n for n in self.C if n not in tied] + [n for n in self.C if n in tied]:
            original = found[name]
            d_out, d_in = weight_out_in(original).shape
            src = self.components[_key(tied[name])] if name in tied else None
            comps = Components(d_in, d_out, self.C[name], tied_to=src)
            self.components[_key(name)] = comps
            ci_in = self.C[name] if isinstance(original, nn.Embedding) else d_in
            self.ci_fns[_key(name)] = make_ci_fn(ci_fn, self.C[name], ci_in, ci_hidden)
            wrapper = DecomposedModule(original, comps)
            parent_name, _, child = name.rpartition(".")
            setattr(target.get_submodule(parent_name) if parent_name else target, child, wrapper)
            self.modules_[name] = wrapper
        self.names = list(self.modules_)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The target's forward (masks, if any, were set by `masked`)."""
        return self.target(*args, **kwargs)

    @contextmanager
    def masked(self, masks: dict[str, Tensor], delta_masks: dict[str, Tensor] | None = None,
               inner: dict[str, Tensor] | None = None):
        """Within the block, module n runs its components with mask masks[n] (the others: the target).
        `inner[n]`, if given, are module n's inner acts, reused instead of recomputed: valid only when
        n's input is the target's (e.g. n alone is masked)."""
        try:
            for n, m in masks.items():
                mod = self.modules_[n]
                mod.mask = m
                mod.delta_mask = delta_masks[n] if delta_masks else None
                mod.inner = inner.get(n) if inner else None
            yield
        finally:
            for mod in self.modules_.values():
                mod.mask = mod.delta_mask = mod.inner = None

    @torch.no_grad()
    def run_target(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
        """Target output and the input of every decomposed module."""
        for mod in self.modules_.values():
            mod.cache_input = True
        try:
            out = self.target(*args, **kwargs)
        finally:
            for mod in self.modules_.values():
                mod.cache_input = False
        inputs = {n: mod.last_input for n, mod in self.modules_.items()}
        for mod in self.modules_.values():
            mod.last_input = None
        return out, inputs

    def inner_acts(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Inner acts (..., C) of every module on its target input (with gradients to V)."""
        return {n: mod.inner_acts(inputs[n]) for n, mod in self.modules_.items()}

    def causal_importances(self, inputs: dict[str, Tensor], inner: dict[str, Tensor] | None = None
                           ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """CI per module (..., C): (lower-leaky for masks, upper-leaky for importance minimality).
        `inner`: the modules' inner acts on `inputs`, if already computed."""
        lower, upper = {}, {}
        for n in self.modules_:
            lower[n], upper[n] = self.module_ci(n, inputs[n], None if inner is None else inner[n])
        return lower, upper

    def module_ci(self, name: str, x: Tensor, inner: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """CI (..., C) of one module on its input x, (lower-leaky, upper-leaky); `inner`: its inner
        acts on x, if already computed."""
        mod = self.modules_[name]
        if self.ci_reads_inner_acts or mod.is_embedding:
            ci_in = inner if inner is not None else mod.inner_acts(x)
        else:
            ci_in = x
        pre = self.ci_fns[_key(name)](ci_in)
        return lower_leaky_hard_sigmoid(pre), upper_leaky_hard_sigmoid(pre)

    @torch.no_grad()
    def ci_of(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """CI (lower-leaky, the one masks use) of every decomposed module on one input batch."""
        _, inputs = self.run_target(*args, **kwargs)
        return self.causal_importances(inputs)[0]

    def untied_names(self) -> list[str]:
        return [n for n in self.names if not self.modules_[n].components.tied]

    def weight_deltas(self) -> dict[str, Tensor]:
        """W - UV per untied module (a tied module's delta is its source's, transposed)."""
        return {n: self.modules_[n].target_weight() - self.modules_[n].components.weight()
                for n in self.untied_names()}

    def decomposition_state(self) -> dict[str, Any]:
        """What a checkpoint holds: components and CI functions, not the (frozen) target."""
        return {"components": self.components.state_dict(), "ci_fns": self.ci_fns.state_dict()}

    def load_decomposition_state(self, state: dict[str, Any]) -> None:
        self.components.load_state_dict(state["components"])
        self.ci_fns.load_state_dict(state["ci_fns"])


# ================================================================================================
# 5. Masks and losses
# ================================================================================================
def sample_masks(ci: dict[str, Tensor], sampling: str, use_delta: bool, generator: torch.Generator | None = None,
                 ddp: Dist = Dist()) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """m = g + (1 - g) r with r ~ U(0, 1) (continuous) or {0, 1} (binomial); the delta mask is r alone.

    Under torchrun every rank draws the noise of the whole global batch and keeps its own rows, so
    a run on N processes samples exactly what a one-process run with the same global batch does.
    """
    def noise(shape: torch.Size, like: Tensor) -> Tensor:
        r = torch.rand((shape[0] * ddp.world_size, *shape[1:]), device=like.device, dtype=like.dtype,
                       generator=generator)
        r = ddp.shard(r)
        return (r < 0.5).to(like.dtype) if sampling == "binomial" else r

    one = torch.ones((), device=next(iter(ci.values())).device) if ci else None
    masks = {n: torch.lerp(g, one.to(g.dtype), noise(g.shape, g)) for n, g in ci.items()}  # one op, same to an ulp
    deltas = {n: noise(g.shape[:-1], g) for n, g in ci.items()} if use_delta else None
    return masks, deltas


def output_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """MSE: mean over all elements. KL(target || pred) of softmax over the last dim, mean over positions."""
    if kind == "mse":
        return F.mse_loss(pred, target)
    logp, logq = F.log_softmax(target, -1), F.log_softmax(pred, -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def faithfulness_loss(model: ComponentModel) -> Tensor:
    """sum ||W - UV||^2 / (number of decomposed parameters), over untied modules."""
    deltas = model.weight_deltas().values()
    return sum((d ** 2).sum() for d in deltas) / sum(d.numel() for d in deltas)


def importance_minimality_loss(ci_upper: dict[str, Tensor], p: float, eps: float = 1e-12) -> Tensor:
    """sum over modules and subcomponents of (g + eps)^p, mean over examples (batch and seq positions)."""
    total = sum(((g + eps) ** p).sum() for g in ci_upper.values())
    n_examples = next(iter(ci_upper.values())).shape[:-1].numel()
    return total / n_examples


def annealed_p(cfg: SPDConfig, frac: float) -> float:
    """p, linearly annealed towards p_anneal_final between the start and end fractions of training."""
    if cfg.p_anneal_final is None or frac <= cfg.p_anneal_start_frac:
        return cfg.p
    span = max(cfg.p_anneal_end_frac - cfg.p_anneal_start_frac, 1e-12)
    t = min((frac - cfg.p_anneal_start_frac) / span, 1.0)
    return cfg.p + t * (cfg.p_anneal_final - cfg.p)


def masked_recon_loss(model: ComponentModel, x: Tensor, target_out: Tensor, masks: dict[str, Tensor],
                      delta_masks: dict[str, Tensor] | None, kind: str, output_fn: Callable[[Any], Tensor],
                      inner: dict[str, Tensor] | None = None) -> Tensor:
    with model.masked(masks, delta_masks, inner):
        return output_loss(output_fn(model(x)), target_out, kind)


def layerwise_recon_loss(model: ComponentModel, x: Tensor, target_out: Tensor, masks: dict[str, Tensor],
                         delta_masks: dict[str, Tensor] | None, kind: str, output_fn: Callable[[Any], Tensor],
                         inner: dict[str, Tensor] | None = None) -> Tensor:
    """Mean over modules of the loss when only that module is masked (the others run the target).
    A module masked alone sees the target's input, so `inner` (its inner acts there) can be reused."""
    losses = [masked_recon_loss(model, x, target_out, {n: m}, {n: delta_masks[n]} if delta_masks else None,
                                kind, output_fn, inner) for n, m in masks.items()]
    return sum(losses) / len(losses)


def training_losses(model: ComponentModel, cfg: SPDConfig, x: Tensor, frac: float,
                    output_fn: Callable[[Any], Tensor], ddp: Dist = Dist()) -> dict[str, Tensor]:
    """Every loss term whose coefficient is set, unweighted, plus `total` (weighted sum), each a
    mean over this rank's examples (x: this rank's shard of the global batch)."""
    target_out, inputs = model.run_target(x)
    target_out = output_fn(target_out)
    coeffs = {"faithfulness": cfg.faithfulness_coeff, "stochastic_recon": cfg.stochastic_recon_coeff,
              "stochastic_recon_layerwise": cfg.stochastic_recon_layerwise_coeff,
              "ci_masked_recon": cfg.ci_masked_recon_coeff,
              "importance_minimality": cfg.importance_minimality_coeff}
    on = {k: c for k, c in coeffs.items() if c}
    # Inner acts on the target's inputs, computed once: the CI functions and the layerwise losses (where
    # each module sees the target's input) share them, which saves a (batch, d_in) x (d_in, C) matmul
    # and its backward per module and mask sample.
    inner = (model.inner_acts(inputs) if model.ci_reads_inner_acts or "stochastic_recon_layerwise" in on
             else None)
    ci, ci_upper = model.causal_importances(inputs, inner)
    losses: dict[str, Tensor] = {}
    if "faithfulness" in on:
        losses["faithfulness"] = faithfulness_loss(model)
    for key, fn, reuse in (("stochastic_recon", masked_recon_loss, None),
                           ("stochastic_recon_layerwise", layerwise_recon_loss, inner)):
        if key in on:
            samples = [fn(model, x, target_out, *sample_masks(ci, cfg.sampling, cfg.use_delta_component, ddp=ddp),
                          cfg.output_loss, output_fn, reuse) for _ in range(cfg.n_mask_samples)]
            losses[key] = sum(samples) / len(samples)
    if "ci_masked_recon" in on:
        losses["ci_masked_recon"] = masked_recon_loss(model, x, target_out, ci, None, cfg.output_loss, output_fn)
    if "importance_minimality" in on:
        losses["importance_minimality"] = importance_minimality_loss(ci_upper, annealed_p(cfg, frac))
    losses["total"] = sum(on[k] * v for k, v in losses.items())
    return losses


# ================================================================================================
# 6. Evaluation
# ================================================================================================
@torch.no_grad()
def evaluate(model: ComponentModel, cfg: SPDConfig, x: Tensor, output_fn: Callable[[Any], Tensor],
             generator: torch.Generator | None = None) -> dict[str, float]:
    """Generic metrics on one batch: per-module L0, fraction of CI >= 0.99, alive count; and the
    output loss against the target with masks = CI, masks = 1 and stochastic masks (no delta,
    noise from `generator`, so that evaluating leaves the training's random stream untouched)."""
    target_out, inputs = model.run_target(x)
    target_out = output_fn(target_out)
    ci, _ = model.causal_importances(inputs)
    out: dict[str, float] = {}
    for n, g in ci.items():
        active = g > cfg.ci_threshold
        out[f"l0/{n}"] = active.sum(-1).float().mean().item()
        out[f"frac_ci_ge_0.99/{n}"] = (g >= 0.99).float().mean().item()
        out[f"n_alive/{n}"] = int(active.flatten(0, -2).any(0).sum().item())
    ones = {n: torch.ones_like(g) for n, g in ci.items()}
    stoch, _ = sample_masks(ci, cfg.sampling, use_delta=False, generator=generator)
    for key, masks in (("ci_masked", ci), ("masks_one", ones), ("stochastic", stoch)):
        out[f"recon/{key}"] = masked_recon_loss(model, x, target_out, masks, None, cfg.output_loss, output_fn).item()
    out["faithfulness"] = faithfulness_loss(model).item()
    return out


# ================================================================================================
# 7. optimize
# ================================================================================================
def lr_at(step: int, cfg: SPDConfig) -> float:
    """Linear warm-up over lr_warmup_frac of training, then constant / cosine / linear decay to 0."""
    warmup = int(cfg.lr_warmup_frac * cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(cfg.steps - warmup, 1)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1 - t)
    return cfg.lr


def autocast(cfg: SPDConfig, device: torch.device):
    """bf16 autocast of forward passes if cfg.autocast_bf16, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)


def faithfulness_warmup(model: ComponentModel, cfg: SPDConfig) -> float:
    """Fit UV to W alone for a few steps (AdamW) so training starts from a faithful decomposition."""
    params = list(model.components.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.faithfulness_warmup_lr, weight_decay=cfg.faithfulness_warmup_weight_decay)
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.faithfulness_warmup_steps):
        loss = faithfulness_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


class MetricsLogger:
    """metrics.jsonl always; wandb only when a project is named (offline without credentials).
    Disabled (writes nothing) on every torchrun rank but 0."""

    def __init__(self, run_dir: Path, cfg: SPDConfig, full_config: dict, enabled: bool = True):
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.wandb = None
        if enabled and cfg.wandb_project:
            import wandb

            has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in (
                (Path.home() / ".netrc").read_text() if (Path.home() / ".netrc").exists() else "")
            mode = os.environ.get("WANDB_MODE", "online" if has_key else "offline")
            self.wandb = wandb.init(project=cfg.wandb_project, config=full_config, dir=str(run_dir),
                                    mode=mode, name=run_dir.name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


# Checkpoints hold everything a bit-exact resume needs: components, CI functions, optimizer state and
# every RNG state (masks are drawn from the global torch RNG; data is indexed by step).
CHECKPOINT_KEYS = ("step", "components", "ci_fns", "optimizer", "rng", "skipped_steps", "train_metrics",
                   "target_digest", "threads")


def rng_state() -> dict[str, Any]:
    """Every RNG state, as tensors and tuples of ints so that torch.load(weights_only=True) reads it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, keys.tolist(), pos, has_gauss, gauss), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])


def target_digest(model: ComponentModel) -> str:
    """sha256 of the frozen target's weights: resuming against a different target is refused."""
    h = hashlib.sha256()
    for name, t in sorted(model.target.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`: a kill at
    any moment leaves the old file or the complete new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, required: tuple[str, ...] = CHECKPOINT_KEYS) -> dict[str, Any]:
    """A checkpoint written by `optimize`, verified: SPDError if it is missing, truncated, corrupt or
    lacks a `required` key (analysis needs only the decomposition, resuming everything)."""
    path = Path(path)
    if not path.is_file():
        raise SPDError(f"checkpoint {path} not found; pass a run's checkpoints/*.pt file")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # the CRC of every record: torch.load does not check the tensor data
        if bad is not None:
            raise ValueError(f"bad CRC in {bad}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SPDError(f"checkpoint {path} is truncated or corrupt ({reason})") from None
    return ckpt


def checkpoint_paths(ckpt_dir: Path) -> list[Path]:
    """Periodic checkpoints (step_N.pt, N = steps done) oldest first, then final.pt if present."""
    periodic = sorted((int(p.stem[5:]), p) for p in ckpt_dir.glob("step_*.pt") if p.stem[5:].isdigit())
    final = ckpt_dir / "final.pt"
    return [p for _, p in periodic] + ([final] if final.exists() else [])


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints (final.pt stays) and torn temporary files."""
    periodic = [p for p in checkpoint_paths(ckpt_dir) if p.name != "final.pt"]
    for p in periodic[:-keep] + list(ckpt_dir.glob(".*.tmp")):
        p.unlink()


def latest_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; a corrupt one is reported and the previous one tried."""
    paths = checkpoint_paths(ckpt_dir)
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except SPDError as e:
            print(f"warning: {e}; falling back to the previous checkpoint", file=sys.stderr)
    if paths:
        raise SPDError(f"none of the {len(paths)} checkpoints in {ckpt_dir} is readable; start the run again")
    return None


@dataclass
class Experiment:
    """What an experiment script's `build(cfg)` makes: the target wrapped for decomposition, and its data."""
    model: ComponentModel
    train_batch: Callable[[int], Tensor]  # step -> that training step's batch
    eval_batch: Callable[[int], Tensor]  # step -> a held-out batch
    output_fn: Callable[[Any], Tensor] = lambda out: out  # target output -> what the output loss compares
    tokenizer: Any = None  # language models only: decodes token ids (analysis shows contexts)


def load_run(run_dir: str | Path) -> tuple[Any, Experiment]:
    """A run dir's config and the Experiment its script builds, with the newest checkpoint's components
    and CI functions loaded. The experiment is the one whose config class reads the run's config.yaml."""
    import importlib
    import typing

    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise SPDError(f"{run_dir} is not a run dir (no config.yaml); pass the directory a decomposition wrote")
    for script in [*EXPERIMENT_SCRIPTS.values(), "lm_decomposition.py"]:
        build = importlib.import_module(Path(script).stem).build
        try:
            cfg = load_config(typing.get_type_hints(build)["cfg"], config)
            break
        except SPDError:
            continue
    else:
        raise SPDError(f"{config} is not the config of any experiment script; was it edited by hand?")
    paths = checkpoint_paths(run_dir / "checkpoints")
    if not paths:
        raise SPDError(f"{run_dir / 'checkpoints'} holds no checkpoint yet; wait for the run's first one")
    target_path = getattr(getattr(cfg, "target", None), "path", None)
    if target_path and not Path(target_path).exists():  # building the run would train a new target
        raise SPDError(f"the target of {run_dir}, {target_path}, is not there (relative to {Path.cwd()}); "
                       f"run from the directory the decomposition ran in")
    state = load_checkpoint(paths[-1], required=("components", "ci_fns"))
    exp = build(cfg)
    if "target_digest" in state and state["target_digest"] != target_digest(exp.model):
        raise SPDError(f"{paths[-1]} was trained against a different target than {config}'s (retrained since?); "
                       f"restore the run's original target file")
    exp.model.load_decomposition_state(state)
    return cfg, exp


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics.jsonl lines logged before `step` (dropping a torn last line), so that a resumed
    run appends exactly the lines an uninterrupted run would have written."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


@contextmanager
def preemption_signals() -> Iterator[list[str]]:
    """Inside, SIGTERM and SIGUSR1 only append their name to the yielded list: the loop checkpoints at
    the next step boundary, where the state is exactly resumable. The old handlers come back after."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
        yield caught
        return
    signals = (signal.SIGTERM, signal.SIGUSR1)
    old = {s: signal.signal(s, lambda signum, _: caught.append(signal.Signals(signum).name)) for s in signals}
    try:
        yield caught
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def nonfinite_term(losses: dict[str, Tensor], grad_norm: Tensor) -> tuple[str, float] | None:
    """(name, value) of the first nan/inf loss term, `total`, or `gradient` (norm); None if all are finite."""
    values = torch.stack([v.detach().float() for v in losses.values()] + [grad_norm.detach().float()])
    finite = torch.isfinite(values)
    if finite.all():  # the one host sync per step that the guard costs
        return None
    i = int((~finite).nonzero()[0])
    return [*losses, "gradient"][i], values[i].item()


def optimize(model: ComponentModel, cfg: SPDConfig, train_batch: Callable[[int], Tensor],
             eval_batch: Callable[[int], Tensor],
             run_dir: Path, eval_fn: Callable[[ComponentModel], dict[str, float]] | None = None,
             output_fn: Callable[[Any], Tensor] = lambda out: out, full_config: dict | None = None) -> dict:
    """Train the components and CI functions of `model`; return the final results.

    `train_batch(step)` / `eval_batch(step)` give the data of each step (indexed, not streamed, so
    that a run is reproducible from its step alone); a training batch is split into
    `grad_accum_steps` micro-batches along its first axis. Every `eval_every` steps (and at the end)
    logs `evaluate` on `eval_batch(step)` plus `eval_fn(model)`.
    Writes metrics.jsonl, checkpoints/step_N.pt (after N steps; the newest keep_checkpoints) and
    checkpoints/final.pt.
    Resume: if run_dir already holds checkpoints (`--resume`), continues from the newest readable
    one, skipping the faithfulness warm-up; the result is bit-identical to an uninterrupted run's on
    the same machine and thread count.
    Preemption: SIGTERM / SIGUSR1 save step_N.pt at the next step boundary and raise `Preempted`.
    A nan/inf loss term or gradient raises SPDError (on_nan=stop) or skips that step (on_nan=skip).
    Under torchrun each rank trains on its shard of the global batch and gradients are averaged, so
    the result equals a one-process run's; rank 0 alone evaluates (on the whole eval batch), logs
    and writes, and the other ranks leave the process when training ends.
    """
    ddp = init_distributed()
    device = next(model.components.parameters()).device
    if cfg.compile:
        model.target.compile()  # in place: every (masked or not) forward goes through the compiled target
    params = [p for p in model.components.parameters()] + [p for p in model.ci_fns.parameters()]
    Opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = Opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_dir = run_dir / "checkpoints"
    digest = target_digest(model)
    start, skipped, train_metrics, last_ckpt = 0, 0, {}, None
    resumed = latest_checkpoint(ckpt_dir)
    if resumed is not None:
        last_ckpt, ckpt = resumed
        if ckpt["target_digest"] != digest:
            raise SPDError(f"{last_ckpt} was trained against a different target (its weights changed since); "
                           f"restore the original target file or start a new run")
        try:
            model.load_decomposition_state(ckpt)
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise SPDError(f"{last_ckpt} does not fit this model ({' '.join(str(e).split())[:200]}); "
                           f"was {run_dir / 'config.yaml'} edited?") from None
        set_rng_state(ckpt["rng"])
        start, skipped, train_metrics = ckpt["step"], ckpt["skipped_steps"], ckpt["train_metrics"]
        if ckpt["threads"] != torch.get_num_threads():
            print(f"warning: {last_ckpt} was written with torch.get_num_threads() = {ckpt['threads']}, now "
                  f"{torch.get_num_threads()}: the result may differ from an uninterrupted run's in the last bits",
                  file=sys.stderr)
        if ddp.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", start)
            print(f"resuming from {last_ckpt} (step {start} of {cfg.steps})")
    logger = MetricsLogger(run_dir, cfg, full_config or {"spd": config_to_dict(cfg)}, enabled=ddp.is_main)

    def run_eval(step: int) -> dict[str, float]:
        noise = torch.Generator(next(iter(params)).device).manual_seed(cfg.seed * 1_000_003 + step)
        with autocast(cfg, device):
            metrics = {f"eval/{k}": v for k, v in evaluate(model, cfg, eval_batch(step), output_fn, noise).items()}
            if eval_fn is not None:
                metrics.update({f"eval/{k}": v for k, v in eval_fn(model).items()})
        logger.log(step, metrics)
        return metrics

    def checkpoint(n: int, name: str) -> Path:
        """Save the state after n steps; parameters that went nan/inf are never saved."""
        if not all(torch.isfinite(p).all() for p in params):
            raise SPDError(f"parameters are not finite after step {n - 1}; not saving {name}, keeping the last "
                           f"good checkpoint ({last_ckpt}); lower spd.lr or set spd.grad_clip")
        path = ckpt_dir / name
        if not ddp.is_main:
            return path
        save_checkpoint(path, {"step": n, **model.decomposition_state(), "optimizer": opt.state_dict(),
                               "rng": rng_state(), "skipped_steps": skipped, "train_metrics": train_metrics,
                               "target_digest": digest, "threads": torch.get_num_threads()})
        prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        return path

    try:
        if resumed is None and cfg.faithfulness_warmup_steps:
            warmup_loss = faithfulness_warmup(model, cfg)
            if not math.isfinite(warmup_loss):
                raise SPDError(f"the faithfulness warm-up loss is {warmup_loss}; lower spd.faithfulness_warmup_lr")
            logger.log(0, {"warmup/faithfulness": warmup_loss})
        t0 = time.time()
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="spd", mininterval=2.0,
                   disable=None if ddp.is_main else True)
        with preemption_signals() as caught:
            for step in bar:
                lr = lr_at(step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                losses: dict[str, Tensor] = {}
                for x in ddp.shard(train_batch(step)).tensor_split(cfg.grad_accum_steps):
                    with autocast(cfg, device):
                        micro = training_losses(model, cfg, x, step / cfg.steps, output_fn, ddp)
                    (micro["total"] / cfg.grad_accum_steps).backward()
                    for k, v in micro.items():  # the mean over micro-batches is the batch's loss
                        losses[k] = losses.get(k, 0) + v.detach() / cfg.grad_accum_steps
                if ddp.world_size > 1:  # mean of the ranks' gradients = gradient of the global-batch mean
                    grads = [p.grad for p in params if p.grad is not None]
                    for g, mean in zip(grads, torch.split(ddp.mean(torch.cat([g.flatten() for g in grads])),
                                                          [g.numel() for g in grads])):
                        g.copy_(mean.view_as(g))
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip is not None
                             else torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                bad = nonfinite_term(losses, grad_norm)
                if ddp.world_size > 1 and ddp.mean(torch.tensor(float(bad is not None))) > 0 and bad is None:
                    bad = ("total (on another rank)", float("nan"))  # every rank must take the same branch
                if bad is None:
                    opt.step()
                    if step % cfg.log_every == 0 or step == cfg.steps - 1:
                        means = ddp.mean(torch.stack([v.detach().float() for v in losses.values()]))
                        train_metrics = {f"train/{k}": v for k, v in zip(losses, means.tolist())} | {"train/lr": lr}
                        logger.log(step, train_metrics)
                        bar.set_postfix(loss=f"{train_metrics['train/total']:.3g}")
                elif cfg.on_nan == "stop":
                    what = "the gradient norm" if bad[0] == "gradient" else f"loss term '{bad[0]}'"
                    raise SPDError(f"{what} is {bad[1]} at step {step}; stopped, keeping the last good checkpoint "
                                   f"({last_ckpt}); lower spd.lr, set spd.grad_clip, or set spd.on_nan=skip")
                else:  # on_nan=skip: no optimizer step, counted
                    skipped += 1
                    logger.log(step, {"train/skipped_steps": skipped})
                if step > 0 and step % cfg.eval_every == 0 and ddp.is_main:
                    run_eval(step)
                n = step + 1  # steps done; a checkpoint at n resumes at step n
                periodic = bool(cfg.checkpoint_every) and n % cfg.checkpoint_every == 0 and n < cfg.steps
                if periodic:
                    last_ckpt = checkpoint(n, f"step_{n}.pt")
                if ddp.world_size > 1:  # a signal to any rank stops them all at the same step
                    if ddp.mean(torch.tensor(float(bool(caught)))) > 0 and not caught:
                        caught.append("a signal to another rank")
                if caught and n < cfg.steps:
                    if not periodic:
                        last_ckpt = checkpoint(n, f"step_{n}.pt")
                    raise Preempted(f"{caught[0]} at step {n} of {cfg.steps}: saved {last_ckpt}; continue with "
                                    f"python {sys.argv[0]} --resume {run_dir}")
        wall = time.time() - t0
        if not ddp.is_main:
            dist.destroy_process_group()
            sys.exit(0)  # rank 0 alone evaluates, makes the figures and writes results
        # final.pt before the final evaluation: a run killed after it resumes to the same results.
        checkpoint(cfg.steps, "final.pt")
        final = run_eval(cfg.steps)
        if ddp.world_size > 1:
            dist.destroy_process_group()
    finally:
        logger.close()
    ran = cfg.steps - start
    results = {"steps": cfg.steps, "resumed_from_step": start if resumed else None, "skipped_steps": skipped,
               "wall_s": round(wall, 2), "steps_per_s": round(ran / max(wall, 1e-9), 2),
               "peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        results["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    # metrics.jsonl keeps the eval/ prefix (beside train/); results.json names the final metrics plainly
    return results | train_metrics | {k.removeprefix("eval/"): v for k, v in final.items()}
