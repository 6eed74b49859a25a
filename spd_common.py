"""Generic Stochastic Parameter Decomposition (SPD) machinery shared by every experiment script.

Sections, in reading order:
  1. Typed configs loaded from YAML, command-line overrides, run directories.
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
import dataclasses
import fnmatch
import json
import math
import os
import random
import resource
import sys
import time
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch import Tensor
from tqdm import tqdm


# ================================================================================================
# 1. Configs, overrides, run directories
# ================================================================================================
class SPDError(Exception):
    """A user-facing error: printed as one line by `run_main`, never as a traceback."""


def F_(default: Any = dataclasses.MISSING, doc: str = "", *, gt: float | None = None,
       ge: float | None = None, le: float | None = None) -> Any:
    """A config field with a one-line doc and optional bounds (checked when the config is loaded)."""
    meta = {"doc": doc, "gt": gt, "ge": ge, "le": le}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


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
    checkpoint_every: Optional[int] = F_(None, "save a checkpoint every N steps (null = final only)", ge=1)
    seed: int = F_(0, "seed of parameters, data and masks")
    device: str = F_("auto", "'auto' (cuda if available), 'cpu' or 'cuda[:i]'")
    wandb_project: Optional[str] = F_(None, "log to this wandb project (null = no wandb)")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"a {origin.__name__} of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against type `tp`, converting where YAML is loose (1 -> 1.0, '1e-3' -> 0.001)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = SPDError(f"key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if len(args) == 2 and type(None) in args and dataclasses.is_dataclass(args[0]):
            return _build_dataclass(args[0], value, key)  # an optional section: keep its own error message
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(arg, value, key)
                except SPDError:
                    pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config type {tp} for '{key}'")


def _build_dataclass(cls: type, raw: Any, prefix: str = "") -> Any:
    where = f"'{prefix}'" if prefix else "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SPDError(f"{where}: expected a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise SPDError(f"unknown key '{prefix}{'.' if prefix else ''}{k}'; "
                           f"valid keys at {where}: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SPDError(f"missing required key '{key}' ({f.metadata.get('doc', _type_name(hints[name]))})")
            continue
        v = _coerce(hints[name], raw[name], key)
        meta = f.metadata
        for bound, ok, word in (("gt", lambda x, b: x > b, ">"), ("ge", lambda x, b: x >= b, ">="),
                                ("le", lambda x, b: x <= b, "<=")):
            b = meta.get(bound)
            if b is not None and isinstance(v, (int, float)) and not ok(v, b):
                raise SPDError(f"key '{key}' = {v!r} is out of range: must be {word} {b} ({meta['doc']})")
        if name == "modules" and isinstance(v, dict):
            for pat, c in v.items():
                if c < 1:
                    raise SPDError(f"key '{key}.{pat}' = {c}: C must be >= 1")
        values[name] = v
    return cls(**values)


def _apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in the raw YAML dict; the value is parsed as YAML (typed later)."""
    if "=" not in override:
        raise SPDError(f"override '{override}' must look like key.sub=value")
    dotted, value = override.split("=", 1)
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SPDError(f"override '{override}': '{k}' is not a section")
    node[keys[-1]] = yaml.safe_load(value) if value else None


def load_config(cls: type, path: str | Path, overrides: list[str] = (), section: str | None = None) -> Any:
    """Load YAML `path` (or its top-level `section`) into dataclass `cls`, applying `key.sub=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise SPDError(f"config file {path} not found; pass the path of a YAML file, e.g. configs/tms_5-2.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise SPDError(f"{path}: malformed YAML{line}: {getattr(e, 'problem', e)}; fix the file's syntax") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise SPDError(f"{path}: expected a mapping of keys to values at the top level")
    try:
        for o in overrides:
            _apply_override(raw, o)
        if section is not None:
            return _build_dataclass(cls, raw.get(section), section)
        return _build_dataclass(cls, raw)
    except SPDError as e:
        raise SPDError(f"{path}{' (with overrides)' if overrides else ''}: {e}") from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def make_run_dir(config_path: Path, out: str | None) -> Path:
    """`out` if given (must be empty or absent), else runs/<config name>/<timestamp>; never overwrites."""
    if out is not None:
        run_dir = Path(out)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise SPDError(f"output dir {run_dir} already holds files; choose another --out or remove it")
    else:
        base = Path("runs") / config_path.stem / datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir, i = base, 1
        while run_dir.exists():
            run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def parse_cli(cls: type, description: str, argv: list[str] | None = None) -> tuple[Any, Path]:
    """`script.py CONFIG.yaml [key.sub=value ...] [--out DIR]` -> (typed config, fresh run dir)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("config", help="YAML config, e.g. configs/tms_5-2.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, typed by the config")
    ap.add_argument("--out", default=None, help="run directory (default runs/<config name>/<timestamp>)")
    args = ap.parse_args(argv)
    cfg = load_config(cls, args.config, args.overrides)
    run_dir = make_run_dir(Path(args.config), args.out)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return cfg, run_dir


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main; a user-facing error becomes one line on stderr and exit code 2."""
    try:
        main()
    except SPDError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_results(run_dir: Path, results: dict) -> Path:
    """Write results.json and print its path as the script's last line."""
    path = run_dir / "results.json"
    path.write_text(json.dumps(results, indent=2))
    print(path)
    return path


def load_or_train_target(cfg: Any, build: Callable[[], nn.Module], train: Callable[[], nn.Module],
                         shape_keys: tuple[str, ...]) -> nn.Module:
    """The frozen target cached at `cfg.path`; trained with `train()` (and cached) when missing.

    The cache stores the target config it was trained with; one whose `shape_keys` differ from
    `cfg` is refused rather than silently loaded into a model of another shape.
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
    components, `((a V^T) * m) U^T (+ delta_mask * a (W - UV)^T) + bias`, on the rows `rows`
    of the batch (all rows if None), and the original module on the others.
    """

    def __init__(self, original: nn.Module, components: Components):
        super().__init__()
        self.original = original
        self._components = [components]
        self.is_embedding = isinstance(original, nn.Embedding)
        self.mask: Tensor | None = None
        self.delta_mask: Tensor | None = None
        self.rows: slice | None = None
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
        out = (self.inner_acts(x) * mask) @ U.T
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
        if self.rows is None:
            return self._masked_forward(x, self.mask, self.delta_mask)
        r = self.rows
        return torch.cat([self.original(x[: r.start]),
                          self._masked_forward(x[r], self.mask, self.delta_mask),
                          self.original(x[r.stop:])])


# ================================================================================================
# 3. Causal-importance functions
# ================================================================================================
def lower_leaky_hard_sigmoid(x: Tensor, slope: float = 0.01) -> Tensor:
    """0.01x below 0, x on [0, 1], 1 above (no gradient). Feeds the masks."""
    return torch.where(x < 0, slope * x, x.clamp(max=1.0))


def upper_leaky_hard_sigmoid(x: Tensor, slope: float = 0.01) -> Tensor:
    """0 below 0 (no gradient), x on [0, 1], 1 + 0.01(x - 1) above. Feeds importance minimality."""
    return torch.where(x > 1, 1 + slope * (x - 1), x.clamp(min=0.0))


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

    baddbmm keeps both passes as single BLAS calls per layer; GELU is the only elementwise work.
    """
    for i in range(start, len(layers), 2):
        x = torch.baddbmm(layers[i + 1], x, layers[i])
        if i < len(layers) - 2:
            x = F.gelu(x)
    return x


class ScalarMLPs(nn.Module):
    """`mlp`: each subcomponent c has its own MLP 1 -> hidden -> 1 reading its own h_c. (..., C) -> (..., C)."""

    def __init__(self, C: int, hidden: list[int]):
        super().__init__()
        self.layers = _init_stack(C, [1, *hidden, 1])

    def forward(self, h: Tensor) -> Tensor:
        x = h.reshape(-1, h.shape[-1]).T.unsqueeze(-1)  # (C, N, 1)
        return _per_component_mlp(x, self.layers)[..., 0].T.reshape(h.shape)


class VectorMLPs(nn.Module):
    """`vector_mlp`: each subcomponent has its own MLP d_in -> hidden -> 1 reading the whole input."""

    def __init__(self, C: int, d_in: int, hidden: list[int]):
        super().__init__()
        self.C = C
        self.layers = _init_stack(C, [d_in, *hidden, 1])

    def forward(self, a: Tensor) -> Tensor:
        w, b = self.layers[0], self.layers[1]  # (C, d_in, H), (C, 1, H)
        a2 = a.reshape(-1, a.shape[-1])  # (N, d_in)
        # All C first layers as one (N, d_in) @ (d_in, C*H) matmul.
        x = (a2 @ w.permute(1, 0, 2).reshape(w.shape[1], -1)).unflatten(-1, (self.C, -1)).transpose(0, 1) + b
        if len(self.layers) > 2:  # x is (C, N, H): the first layer's pre-activation
            x = _per_component_mlp(F.gelu(x), self.layers, start=2)
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
        self.names = list(self.C)
        self.ci_reads_inner_acts = ci_fn == "mlp"
        self.components = nn.ModuleDict()
        self.ci_fns = nn.ModuleDict()
        self.modules_: dict[str, DecomposedModule] = {}
        for name in [n for n in self.names if n not in tied] + [n for n in self.names if n in tied]:
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
               rows: dict[str, slice] | None = None):
        """Within the block, module n uses components with mask masks[n] (on batch rows rows[n])."""
        try:
            for n, m in masks.items():
                mod = self.modules_[n]
                mod.mask = m
                mod.delta_mask = delta_masks[n] if delta_masks else None
                mod.rows = rows[n] if rows else None
            yield
        finally:
            for mod in self.modules_.values():
                mod.mask = mod.delta_mask = mod.rows = None

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

    def causal_importances(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """CI per module (..., C): (lower-leaky for masks, upper-leaky for importance minimality)."""
        lower, upper = {}, {}
        for n, mod in self.modules_.items():
            x = inputs[n]
            ci_in = mod.inner_acts(x) if (self.ci_reads_inner_acts or mod.is_embedding) else x
            pre = self.ci_fns[_key(n)](ci_in)
            lower[n], upper[n] = lower_leaky_hard_sigmoid(pre), upper_leaky_hard_sigmoid(pre)
        return lower, upper

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
def sample_masks(ci: dict[str, Tensor], sampling: str, use_delta: bool,
                 generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """m = g + (1 - g) r with r ~ U(0, 1) (continuous) or {0, 1} (binomial); the delta mask is r alone."""
    def noise(shape: torch.Size, like: Tensor) -> Tensor:
        r = torch.rand(shape, device=like.device, dtype=like.dtype, generator=generator)
        return (r < 0.5).to(like.dtype) if sampling == "binomial" else r

    masks = {n: g + (1 - g) * noise(g.shape, g) for n, g in ci.items()}
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
                      delta_masks: dict[str, Tensor] | None, kind: str,
                      output_fn: Callable[[Any], Tensor]) -> Tensor:
    with model.masked(masks, delta_masks):
        return output_loss(output_fn(model(x)), target_out, kind)


def layerwise_recon_loss(model: ComponentModel, x: Tensor, target_out: Tensor, masks: dict[str, Tensor],
                         delta_masks: dict[str, Tensor] | None, kind: str,
                         output_fn: Callable[[Any], Tensor]) -> Tensor:
    """Mean over modules of the loss when only that module is masked, as ONE forward pass: the batch
    is repeated once per module and module l is masked on copy l only."""
    B, L = x.shape[0], len(masks)
    rows = {n: slice(i * B, (i + 1) * B) for i, n in enumerate(masks)}
    x_rep = x.repeat(L, *([1] * (x.dim() - 1)))
    with model.masked(masks, delta_masks, rows):
        out = output_fn(model(x_rep))
    return output_loss(out, target_out.repeat(L, *([1] * (target_out.dim() - 1))), kind)


def training_losses(model: ComponentModel, cfg: SPDConfig, x: Tensor, frac: float,
                    output_fn: Callable[[Any], Tensor]) -> dict[str, Tensor]:
    """Every loss term whose coefficient is set, unweighted, plus `total` (weighted sum)."""
    target_out, inputs = model.run_target(x)
    target_out = output_fn(target_out)
    ci, ci_upper = model.causal_importances(inputs)
    coeffs = {"faithfulness": cfg.faithfulness_coeff, "stochastic_recon": cfg.stochastic_recon_coeff,
              "stochastic_recon_layerwise": cfg.stochastic_recon_layerwise_coeff,
              "ci_masked_recon": cfg.ci_masked_recon_coeff,
              "importance_minimality": cfg.importance_minimality_coeff}
    on = {k: c for k, c in coeffs.items() if c}
    losses: dict[str, Tensor] = {}
    if "faithfulness" in on:
        losses["faithfulness"] = faithfulness_loss(model)
    for key, fn in (("stochastic_recon", masked_recon_loss), ("stochastic_recon_layerwise", layerwise_recon_loss)):
        if key in on:
            samples = [fn(model, x, target_out, *sample_masks(ci, cfg.sampling, cfg.use_delta_component),
                          cfg.output_loss, output_fn) for _ in range(cfg.n_mask_samples)]
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
def evaluate(model: ComponentModel, cfg: SPDConfig, x: Tensor,
             output_fn: Callable[[Any], Tensor]) -> dict[str, float]:
    """Generic metrics on one batch: per-module L0, fraction of CI >= 0.99, alive count; and the
    output loss against the target with masks = CI, masks = 1 and stochastic masks (no delta)."""
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
    stoch, _ = sample_masks(ci, cfg.sampling, use_delta=False)
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
    """metrics.jsonl always; wandb only when a project is named (offline without credentials)."""

    def __init__(self, run_dir: Path, cfg: SPDConfig, full_config: dict):
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.wandb = None
        if cfg.wandb_project:
            import wandb

            has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in (
                (Path.home() / ".netrc").read_text() if (Path.home() / ".netrc").exists() else "")
            mode = os.environ.get("WANDB_MODE", "online" if has_key else "offline")
            self.wandb = wandb.init(project=cfg.wandb_project, config=full_config, dir=str(run_dir),
                                    mode=mode, name=run_dir.name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_checkpoint(path: Path, model: ComponentModel, opt: torch.optim.Optimizer, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, **model.decomposition_state(), "optimizer": opt.state_dict()}, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise SPDError(f"checkpoint {path} not found; pass a run's checkpoints/*.pt file")
    return torch.load(path, map_location="cpu", weights_only=True)


def optimize(model: ComponentModel, cfg: SPDConfig, train_batch: Callable[[int], Tensor],
             eval_batch: Callable[[int], Tensor],
             run_dir: Path, eval_fn: Callable[[ComponentModel], dict[str, float]] | None = None,
             output_fn: Callable[[Any], Tensor] = lambda out: out, full_config: dict | None = None) -> dict:
    """Train the components and CI functions of `model`; return the final results.

    `train_batch(step)` / `eval_batch(step)` give the data of each step (indexed, not streamed, so
    that a run is reproducible from its step alone); a training batch is split into
    `grad_accum_steps` micro-batches along its first axis. Every `eval_every` steps (and at the end)
    logs `evaluate` on `eval_batch(step)` plus `eval_fn(model)`.
    Writes metrics.jsonl, checkpoints/step_N.pt (periodic) and checkpoints/final.pt.
    """
    device = next(model.components.parameters()).device
    if cfg.compile:
        model.target.compile()  # in place: every (masked or not) forward goes through the compiled target
    params = [p for p in model.components.parameters()] + [p for p in model.ci_fns.parameters()]
    Opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = Opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    logger = MetricsLogger(run_dir, cfg, full_config or {"spd": config_to_dict(cfg)})
    if cfg.faithfulness_warmup_steps:
        logger.log(0, {"warmup/faithfulness": faithfulness_warmup(model, cfg)})

    def run_eval(step: int) -> dict[str, float]:
        with autocast(cfg, device):
            metrics = {f"eval/{k}": v for k, v in evaluate(model, cfg, eval_batch(step), output_fn).items()}
            if eval_fn is not None:
                metrics.update({f"eval/{k}": v for k, v in eval_fn(model).items()})
        logger.log(step, metrics)
        return metrics

    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="spd", mininterval=2.0, disable=None)
    train_metrics: dict[str, float] = {}
    for step in bar:
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        losses: dict[str, Tensor] = {}
        for x in train_batch(step).tensor_split(cfg.grad_accum_steps):
            with autocast(cfg, device):
                micro = training_losses(model, cfg, x, step / cfg.steps, output_fn)
            (micro["total"] / cfg.grad_accum_steps).backward()
            for k, v in micro.items():  # the mean over micro-batches is the batch's loss
                losses[k] = losses.get(k, 0) + v.detach() / cfg.grad_accum_steps
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            train_metrics = {f"train/{k}": v.item() for k, v in losses.items()} | {"train/lr": lr}
            logger.log(step, train_metrics)
            bar.set_postfix(loss=f"{train_metrics['train/total']:.3g}")
        if step > 0 and step % cfg.eval_every == 0:
            run_eval(step)
        if cfg.checkpoint_every and step > 0 and step % cfg.checkpoint_every == 0:
            save_checkpoint(run_dir / "checkpoints" / f"step_{step}.pt", model, opt, step)
    wall = time.time() - t0
    final = run_eval(cfg.steps)
    save_checkpoint(run_dir / "checkpoints" / "final.pt", model, opt, cfg.steps)
    logger.close()
    results = {"steps": cfg.steps, "wall_s": round(wall, 2), "steps_per_s": round(cfg.steps / wall, 2),
               "peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        results["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return results | train_metrics | final
