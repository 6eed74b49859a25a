"""Everything around the method that a run needs: run directories and the command line, torchrun,
seeds and devices, cached targets, metrics, checkpoints, resume and preemption, and loading a run back
for analysis. The method itself (components, CI functions, losses, `optimize`) is in spd_common.py;
typed YAML configs are in spd_config.py.

Sections, in reading order:
  1. Run directories and the command line: `parse_cli`, `run_main`, run.json (which script made a run).
  2. Batches and torchrun: batches of several tensors, `Dist` (this process's rank and collectives).
  3. Seeds, devices, results.
  4. Targets: trained once, cached.
  5. Metrics, checkpoints, preemption: what makes `--resume` bit-exact.
  6. Loading a run for analysis: `load_run`.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import dataclasses
import hashlib
import json
import os
import random
import resource
import signal
import sys
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch import Tensor
from torch.distributed.tensor import DTensor

from spd_config import SPDError, config_to_dict, load_config
from spd_fsdp import gathered, sharded_optimizer_state, sharded_state

class Decomposition(Protocol):
    """What runs, checkpoints and resume need of spd_common.ComponentModel (typed here, so that this file,
    below the method, never imports it)."""
    target: nn.Module

    def decomposition_state(self) -> dict[str, Any]: ...

    def load_decomposition_state(self, state: dict[str, Any]) -> None: ...


# ================================================================================================
# 1. Run directories and the command line
# ================================================================================================
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped by SIGTERM/SIGUSR1/Ctrl-C with a checkpoint saved; --resume


class Preempted(Exception):
    """SIGTERM, SIGUSR1 or Ctrl-C arrived and `optimize` saved a checkpoint; `run_main` exits with EXIT_PREEMPTED."""


ROOT = Path(__file__).resolve().parent


RUN_RECORD = "run.json"  # in every run dir: the experiment script that made it, for load_run and --resume


def import_script(script: str | Path) -> Any:
    """An experiment script as a module, imported by its path once (its main does not run)."""
    import importlib.util

    path = Path(script).resolve()
    names = [path.stem, f"{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"]  # the 2nd: a namesake
    for module in [sys.modules.get("__main__")] + [sys.modules.get(n) for n in names]:
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path:
            return module
    name = names[names[0] in sys.modules]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and type hints look the module up
    spec.loader.exec_module(module)
    return module


def config_class(module: Any) -> type:
    """The config class of an experiment script: the annotation of its `build(cfg)`'s argument."""
    import inspect
    import typing

    build = getattr(module, "build", None)
    params = list(inspect.signature(build).parameters) if callable(build) else []
    cls = typing.get_type_hints(build).get(params[0]) if params else None
    if not isinstance(cls, type):
        raise SPDError(f"{module.__file__} has no module-level `build(cfg: YourConfig) -> Experiment` with its "
                       f"config class annotated; every experiment script needs one (README: Adding an experiment)")
    return cls


def script_for(config: str | Path) -> str:
    """The experiment script that runs `config`: the one `*_decomposition.py` beside this file whose
    config class reads it. None or several (a copied script reads its original's configs too) is an
    SPDError: then name the script (a sweep section's `script:`, bench.py's --script)."""
    readers = []
    for script in sorted(ROOT.glob("*_decomposition.py")):
        try:
            load_config(config_class(import_script(script)), config)
            readers.append(script.name)
        except SPDError:
            continue
    if len(readers) != 1:
        found = f"is read by {' and '.join(readers)}" if readers else "is read by no *_decomposition.py script"
        raise SPDError(f"config {config} {found}; name the experiment script that runs it")
    return readers[0]


def run_script(run_dir: Path) -> Path:
    """The experiment script that made a run dir, from its run.json (runs from before run.json
    existed: the one script that reads its config.yaml)."""
    record = run_dir / RUN_RECORD
    if not record.is_file():
        return ROOT / script_for(run_dir / "config.yaml")
    script = Path(json.loads(record.read_text())["script"])
    if not script.is_file() and (ROOT / script.name).is_file():  # the repository moved since
        script = ROOT / script.name
    if not script.is_file():
        raise SPDError(f"{run_dir} was made by {script}, which is not there any more; restore it or edit "
                       f"{record} to name where it is now")
    return script


def make_run_dir(config_path: Path, out: str | None) -> Path:
    """`out` if given (absent, empty, or holding only the config.yaml and run.json of a run that failed
    before it started), else runs/<config name>/<timestamp>; never overwrites results."""
    if out is not None:
        run_dir = Path(out)
        if run_dir.exists() and not run_dir.is_dir():
            raise SPDError(f"--out {run_dir} is a file, not a directory; choose another --out")
        if run_dir.exists() and any(p.name not in ("config.yaml", RUN_RECORD) for p in run_dir.iterdir()):
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
        cfg, run_dir = load_config(cls, Path(message[0]) / "config.yaml"), Path(message[0])
    else:
        try:
            cfg, run_dir = _config_and_run_dir(cls, args, error)
        except SPDError as e:
            if ddp.world_size > 1:
                dist.broadcast_object_list([f"error: {e}"], src=0)
            raise
        if ddp.world_size > 1:
            dist.broadcast_object_list([str(run_dir)], src=0)
    share_threads(cfg.spd.threads)  # before anything heavy: the target may be trained first
    if cfg.spd.fsdp and cfg.spd.fsdp_blocks and ddp.world_size > 1:
        # Every forward gathers each sharded block's weights and frees them after: kept in malloc's heap, those
        # blocks were not reused and a rank's peak RSS doubled (SmolLM2 layers 0-2, 2 ranks: 4232 -> 2237 MB)
        reuse_freed_memory(largest=1 << 20, keep=128 << 10)
    else:
        reuse_freed_memory()
    return cfg, run_dir


# The torch threads of a run started without spd.threads or OMP_NUM_THREADS: this machine's cores,
# less those that runs with a fixed count hold, shared equally among the other spd runs on it (each
# run registers its pid under ~/.cache/spd/runs, a fixed one with its thread count) and re-shared as
# runs come and go, so that runs started side by side (or torchrun's ranks) never oversubscribe the
# cores; torch threads fighting over a core lose several times their speed.
RUNS_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spd" / "runs"
_fixed_threads: int | None = None
_sharing = False
_registered = False


def share_threads(threads: int | None) -> None:
    """Fix the thread count (spd.threads, else OMP_NUM_THREADS if set), or take this process's share."""
    global _fixed_threads, _sharing, _registered
    _fixed_threads = threads or (int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None)
    _sharing = _fixed_threads is None
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    entry = RUNS_DIR / str(os.getpid())
    entry.write_text(str(_fixed_threads or ""))  # empty: sharing
    if not _registered:
        atexit.register(entry.unlink, missing_ok=True)
        _registered = True
    rebalance_threads()


def rebalance_threads() -> None:
    """Set torch's thread count to the fixed one or to this process's current share of the cores."""
    if _fixed_threads is not None:
        torch.set_num_threads(_fixed_threads)
    elif _sharing:
        sharing, held = 0, 0
        for entry in RUNS_DIR.iterdir():
            if not Path(f"/proc/{entry.name}").exists():
                entry.unlink(missing_ok=True)  # a run that died without cleaning up
                continue
            try:
                fixed = entry.read_text().strip()
            except OSError:  # it finished just now
                continue
            if fixed.isdigit():
                held += int(fixed)
            else:
                sharing += 1
        want = max(1, (len(os.sched_getaffinity(0)) - held) // max(sharing, 1))
        if want != torch.get_num_threads():
            torch.set_num_threads(want)


def reuse_freed_memory(largest: int = 32 << 20, keep: int = 1 << 30) -> None:
    """Have glibc's malloc serve blocks up to `largest` bytes from its heap and keep up to `keep`
    freed bytes there, instead of unmapping them. torch frees and reallocates every step's activations;
    glibc's defaults (large blocks mapped, freed heap memory over a few MiB trimmed) hand them back to the
    kernel, so they come back as fresh pages, one page fault per 4 KiB touched: on resid_mlp1 (many
    (1024, 1000) tensors) 5x the page faults and ~20% of a CPU step. Peak
    memory is unchanged (freed blocks are reused, not added to). Does nothing without glibc (macOS)."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, largest)  # 32 MiB is glibc's maximum for this setting
    mallopt(M_TRIM_THRESHOLD, keep)


def _config_and_run_dir(cls: type, args: argparse.Namespace, error: Callable[[str], None]) -> tuple[Any, Path]:
    """The config and run dir of a new run (made here) or of the run being resumed."""
    if args.resume is not None:
        if args.config or args.overrides or args.out:
            raise SPDError(f"--resume {args.resume} continues the run with its own config.yaml; drop CONFIG, "
                           f"overrides and --out (edit {Path(args.resume) / 'config.yaml'} to change it)")
        run_dir = Path(args.resume)
        check_resumable(run_dir)
        made_by, this = run_script(run_dir).resolve(), script_of(cls)
        if made_by.name != this.name:  # by name: the same script in another clone or worktree continues it
            raise SPDError(f"--resume {run_dir}: that run was made by {made_by.name}, not {this.name}; continue it "
                           f"with python {made_by} --resume {run_dir}")
        return load_config(cls, run_dir / "config.yaml"), run_dir
    if args.config is None:
        error("no config given: pass CONFIG.yaml (e.g. configs/tms_5-2.yaml) or --resume RUN_DIR")
    cfg = load_config(cls, args.config, args.overrides)
    run_dir = make_run_dir(Path(args.config), args.out)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    (run_dir / RUN_RECORD).write_text(json.dumps({"script": str(script_of(cls)), "argv": sys.argv}, indent=2))
    return cfg, run_dir


def script_of(cls: type) -> Path:
    """The file of the experiment script that defines config class `cls`."""
    return Path(sys.modules[cls.__module__].__file__).resolve()


def launched_world_size() -> int:
    """How many processes torchrun started for this job (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main; a user-facing error becomes one line on stderr and exit code 2, a
    preemption one line and EXIT_PREEMPTED."""
    code = 0
    try:
        main()
    except SPDError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        code = EXIT_PREEMPTED
    if launched_world_size() > 1:
        # A torchrun rank leaves without the interpreter's teardown. A gloo worker thread may still be releasing
        # a finished collective of spd.fsdp's that holds a Python object; doing so while the interpreter
        # finalizes aborts the process ("terminate called without an active exception", SIGABRT; 3 in ~60
        # two-rank TMS runs on 2 busy cores), and torchrun then kills the other ranks, rank 0 before it
        # writes results.json.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


# ================================================================================================
# 2. Batches and torchrun
# ================================================================================================
Batch = Any  # one step's data: a tensor, or a tuple / list / dict of tensors (inputs, labels, masks, ...)


def map_batch(batch: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    """`fn` applied to every tensor of a batch, keeping its structure (examples lie along axis 0)."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_batch(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_batch(v, fn) for v in batch)
    raise SPDError(f"a batch must be a tensor, or a tuple / list / dict of tensors, not {type(batch).__name__}; "
                   f"fix the experiment's train_batch / eval_batch")


def split_batch(batch: Batch, n: int) -> list[Batch]:
    """`n` micro-batches of (nearly) equal size along the examples axis."""
    return [map_batch(batch, lambda t: t.tensor_split(n)[i]) for i in range(n)]


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job; rank 0 of 1 without torchrun."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Batch) -> Batch:
        """This rank's equal share of the rows of a global batch (of each of its tensors)."""
        def rows(x: Tensor) -> Tensor:
            if x.shape[0] % self.world_size:
                raise SPDError(f"a batch of {x.shape[0]} does not split over {self.world_size} processes; "
                               f"make spd.batch_size and spd.eval_batch_size multiples of the process count")
            n = x.shape[0] // self.world_size
            return x[self.rank * n: (self.rank + 1) * n]

        return map_batch(batch, rows)

    def mean(self, values: Tensor) -> Tensor:
        """Average over ranks (a no-op on one process). `values` must be on the training device:
        NCCL reduces CUDA tensors only."""
        if self.world_size > 1:
            dist.all_reduce(values)
            values = values / self.world_size
        return values

    def global_sum(self, local: Tensor) -> Tensor:
        """The sum of `local` over ranks, differentiable through this rank's part with its gradient
        scaled by world_size: `average_gradients` divides by world_size again, so that a loss that is a
        function of a global-batch sum gets the gradient it has on one process."""
        if self.world_size == 1:
            return local
        total = local.detach().clone()
        dist.all_reduce(total)
        scaled = local * self.world_size
        return scaled + (total - scaled).detach()

    def gather(self, local: Tensor) -> Tensor:
        """This rank's rows of a global batch put back together: every rank's `local`, concatenated in rank
        order along the first axis (the inverse of `shard`)."""
        if self.world_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is set on any rank, so that every rank takes the same branch. It travels as
        a tensor on `device`, the training device (a CPU tensor would fail under NCCL)."""
        if self.world_size == 1:
            return flag
        return self.mean(torch.tensor(float(flag), device=device)).item() > 0

    def close(self) -> None:
        """Leave the torchrun job (a no-op on one process)."""
        if self.world_size > 1:
            dist.destroy_process_group()


def init_distributed() -> Dist:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK.

    `optimize` reduces tensors on the training device (NCCL takes CUDA tensors only, and a CPU copy
    would cost a transfer each way). On a GPU node the group is still `cpu:gloo,cuda:nccl`, so that
    a run with spd.device=cpu there reduces its CPU tensors through gloo instead of failing."""
    world_size = launched_world_size()
    if world_size == 1:
        return Dist()
    if not dist.is_initialized():
        if torch.cuda.is_available() and int(os.environ["LOCAL_RANK"]) < torch.cuda.device_count():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # so that device "cuda" is this rank's GPU
        # Rank 0 evaluates alone while the others wait in the next step's all-reduce: an LM evaluation with PGD
        # can outlast NCCL's default 10-minute timeout, which would kill the job
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(hours=1))
    return Dist(dist.get_rank(), world_size)


def nonfinite_term(losses: dict[str, Tensor], grad_norm: Tensor) -> tuple[str, float] | None:
    """(name, value) of the first nan/inf loss term, `total`, or `gradient` (norm); None if all are finite."""
    values = torch.stack([v.detach().float() for v in losses.values()] + [grad_norm.detach().float()])
    finite = torch.isfinite(values)
    if finite.all():  # the one host sync per step that the guard costs
        return None
    i = int((~finite).nonzero()[0])
    return [*losses, "gradient"][i], values[i].item()


def clip_grad_norm(params: list[Tensor], max_norm: float | None) -> Tensor:
    """The gradients' global norm (a plain tensor, also of sharded gradients), after clipping it to max_norm
    (spd.grad_clip; None: not clipped)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # spd.fsdp: each rank's part, summed
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def average_gradients(params: list[Tensor], ddp: Dist) -> None:
    """Replace each rank's gradients by their mean over ranks (= the gradient of the global-batch mean
    loss), in one all-reduce."""
    if ddp.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    means = ddp.mean(torch.cat([g.flatten() for g in grads]))
    for g, mean in zip(grads, means.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


@contextmanager
def main_rank_first() -> Iterator[None]:
    """Under torchrun, rank 0 runs the block first and the other ranks after it has finished (e.g. rank 0
    builds a missing target and caches it, the others find the cache); on one process, just the block."""
    ddp = init_distributed()
    if not ddp.is_main:
        dist.barrier()
    yield
    if ddp.is_main and ddp.world_size > 1:  # not reached when rank 0's block raises: torchrun stops them all
        dist.barrier()


# ================================================================================================
# 3. Seeds, devices, results
# ================================================================================================
def step_generator(seed: int, step: int, device: torch.device | str | None = None) -> torch.Generator:
    """The random generator of one step's data or noise: a function of (seed, step) alone, so that any
    step can be drawn again (on resume, on every rank)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def eval_seed(seed: int) -> int:
    """The seed of the held-out data stream, apart from the training stream's."""
    return seed + 10_000


def step_batches(make: Callable[[int, int, int], Any], spd: Any) -> tuple[Callable[[int], Any], Callable[[int], Any]]:
    """(train_batch, eval_batch) from a data source `make(batch_size, seed, step)`: the training
    stream at spd.batch_size and spd.seed, the held-out one at spd.eval_batch_size and eval_seed."""
    return (lambda step: make(spd.batch_size, spd.seed, step),
            lambda step: make(spd.eval_batch_size, eval_seed(spd.seed), step))


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
    if device.type == "cuda" and device.index is not None and launched_world_size() > 1:
        raise SPDError(f"spd.device = '{name}' would put every torchrun rank on that one GPU; set spd.device=cuda "
                       f"(or auto): each rank takes GPU LOCAL_RANK")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SPDError(f"spd.device = '{name}' but this machine has {torch.cuda.device_count()} CUDA device(s); "
                       f"set spd.device=auto or cpu")
    return device


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def figures_dir(run_dir: Path) -> Path:
    """run_dir/figures, where a script saves its plots (created if missing)."""
    path = run_dir / "figures"
    path.mkdir(exist_ok=True)
    return path


def write_results(run_dir: Path, results: dict) -> Path:
    """Write results.json and print its path as the script's last line."""
    path = run_dir / "results.json"
    path.write_text(json.dumps(results, indent=2))
    print(path)
    return path


# ================================================================================================
# 4. Targets: trained once, cached
# ================================================================================================
def target_main(cfg_cls: type, load_or_train: Callable[[Any], Any], section: str = "target") -> None:
    """`python -m train_targets.<name> CONFIG.yaml`: build (or find cached) the target that the
    decomposition config's `target:` (or `section`) section describes, and print where it is."""
    def main() -> None:
        if len(sys.argv) != 2:
            raise SPDError(f"usage: python -m train_targets.{Path(sys.argv[0]).stem} CONFIG.yaml")
        cfg = load_config(cfg_cls, sys.argv[1], section=section)
        load_or_train(cfg)
        print(cfg.path)

    run_main(main)


def load_or_train_target(cfg: Any, build: Callable[[], nn.Module], train: Callable[[], nn.Module],
                         shape_keys: tuple[str, ...]) -> nn.Module:
    """The frozen target cached at `cfg.path`; trained with `train()` (and cached) when missing. `cfg` is the
    target's config dataclass: its `path` names the cache file and its `steps` are said when training.

    The cache stores the target config it was trained with; one whose `shape_keys` differ from
    `cfg` is refused rather than silently loaded into a model of another shape, and one trained
    with other settings (steps, weight decay, ...) is used with a note saying so.
    """
    path = Path(cfg.path)
    with main_rank_first():  # under torchrun, rank 0 trains a missing target; the others then load it
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
# 5. Metrics, checkpoints, preemption
# ================================================================================================
class MetricsLogger:
    """metrics.jsonl always; wandb only when a project is named (offline without credentials).
    Disabled (writes nothing) on every torchrun rank but 0."""

    def __init__(self, run_dir: Path, wandb_project: str | None, full_config: dict, enabled: bool = True):
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.wandb = None
        if enabled and wandb_project:
            import wandb

            has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in (
                (Path.home() / ".netrc").read_text() if (Path.home() / ".netrc").exists() else "")
            mode = os.environ.get("WANDB_MODE", "online" if has_key else "offline")
            self.wandb = wandb.init(project=wandb_project, config=full_config, dir=str(run_dir),
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


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG state, as tensors and tuples of ints so that torch.load(weights_only=True) reads it. Of the
    CUDA generators only the training device's: under torchrun each rank draws from its own GPU's, all in one
    state (same seed, same draws), so rank 0's is every rank's (each GPU's of rank 0's process were not)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": (kind, keys.tolist(), pos, has_gauss, gauss), "python": random.getstate()}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # older checkpoints held every GPU's state of the writing process: under
        # torchrun rank 0's, which drew from GPU 0; one process drew from its own device
        i = 0 if launched_world_size() > 1 else (device.index or 0)
        cuda = cuda[i] if i < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])


def target_digest(model: Decomposition) -> str:
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
    """Inside, SIGTERM, SIGUSR1 and a first Ctrl-C (SIGINT) only append their name to the yielded list:
    the loop checkpoints at the next step boundary, where the state is exactly resumable. A second Ctrl-C
    stops at once (KeyboardInterrupt), without one. The old handlers come back after."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
        yield caught
        return

    def handle(signum: int, _: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and name in caught:
            raise KeyboardInterrupt
        if name == "SIGINT":
            print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again: stop now, without one)",
                  file=sys.stderr)
        caught.append(name)

    old = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        yield caught
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@dataclass
class TrainState:
    """Where training stands, beyond the parameters and optimizer: what a checkpoint adds to them."""
    step: int = 0  # steps done: a checkpoint after N steps resumes at step N
    skipped: int = 0  # steps skipped for a nan/inf loss or gradient (spd.on_nan=skip)
    train_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the losses logged last
    last_ckpt: Path | None = None  # the newest checkpoint written, or resumed from
    resumed_from: int | None = None  # the step this process resumed at (None: a fresh run)
    adversary: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # persistent PGD's state (its Adam's)


def training_device(opt: torch.optim.Optimizer) -> torch.device:
    """The device the trained parameters live on."""
    return opt.param_groups[0]["params"][0].device


def save_training_checkpoint(path: Path, model: Decomposition, opt: torch.optim.Optimizer, state: TrainState,
                             digest: str, is_main: bool, keep: int) -> None:
    """Checkpoint the state after `state.step` steps (every rank calls it, rank 0 writes; sharded
    parameters and optimizer state are gathered whole) and keep the newest `keep` periodic ones; parameters
    that went nan/inf are never saved."""
    decomposition, optimizer = gathered(model.decomposition_state()), gathered(opt.state_dict())
    if not all(torch.isfinite(t).all() for part in decomposition.values() for t in part.values()):
        raise SPDError(f"parameters are not finite after step {state.step - 1}; not saving {path.name}, keeping the "
                       f"last good checkpoint ({state.last_ckpt}); lower spd.lr or set spd.grad_clip")
    if is_main:
        save_checkpoint(path, {"step": state.step, **decomposition, "optimizer": optimizer,
                               "rng": rng_state(training_device(opt)), "skipped_steps": state.skipped,
                               "train_metrics": state.train_metrics, "target_digest": digest,
                               "threads": torch.get_num_threads(), "adversary": state.adversary})
        prune_checkpoints(path.parent, keep)
    state.last_ckpt = path


def resume_training(run_dir: Path, model: Decomposition, opt: torch.optim.Optimizer, digest: str,
                    is_main: bool, steps: int) -> TrainState:
    """A fresh TrainState, or (`--resume`) the one of the newest readable checkpoint in run_dir, whose
    components, CI functions, optimizer and RNG states are loaded; metrics.jsonl is cut back to it."""
    resumed = latest_checkpoint(run_dir / "checkpoints")
    if resumed is None:
        return TrainState()
    path, ckpt = resumed
    if ckpt["target_digest"] != digest:
        raise SPDError(f"{path} was trained against a different target (its weights changed since); "
                       f"restore the original target file or start a new run")
    try:
        # spd.fsdp: each rank loads its shards of the whole tensors saved
        own = model.decomposition_state()
        model.load_decomposition_state({k: sharded_state(ckpt[k], own[k]) for k in own})
        opt.load_state_dict(sharded_optimizer_state(ckpt["optimizer"], opt))
    except (RuntimeError, ValueError, KeyError) as e:
        raise SPDError(f"{path} does not fit this model ({' '.join(str(e).split())[:200]}); "
                       f"was {run_dir / 'config.yaml'} edited?") from None
    set_rng_state(ckpt["rng"], training_device(opt))
    if ckpt["threads"] != torch.get_num_threads():
        print(f"warning: {path} was written with torch.get_num_threads() = {ckpt['threads']}, now "
              f"{torch.get_num_threads()}: the result may differ from an uninterrupted run's in the last bits",
              file=sys.stderr)
    if is_main:
        truncate_metrics(run_dir / "metrics.jsonl", ckpt["step"])
        print(f"resuming from {path} (step {ckpt['step']} of {steps})")
    device = opt.param_groups[0]["params"][0].device
    adversary = {k: v.to(device) for k, v in ckpt.get("adversary", {}).items()}
    return TrainState(ckpt["step"], ckpt["skipped_steps"], ckpt["train_metrics"], path, ckpt["step"], adversary)


# ================================================================================================
# 6. Loading a run for analysis
# ================================================================================================
def device_here(cfg: Any, run_dir: Path) -> None:
    """A run trained on a GPU this machine lacks (e.g. on a cluster node, analysed on a laptop) is loaded on the
    device this machine has: cfg.spd.device becomes auto, with a note."""
    spd = getattr(cfg, "spd", None)
    try:
        lacking = spd.device.startswith("cuda") and (torch.device(spd.device).index or 0) >= torch.cuda.device_count()
    except (AttributeError, RuntimeError):  # no spd section, or not a device: get_device says so in one line
        return
    if lacking:
        print(f"note: {run_dir} ran on {spd.device}, which this machine lacks: loading it on "
              f"{'cuda' if torch.cuda.is_available() else 'the CPU'}", file=sys.stderr)
        spd.device = "auto"


def load_run(run_dir: str | Path) -> tuple[Any, Any]:
    """A run dir's config and the spd_common.Experiment its script (recorded in run.json) builds, with the
    newest checkpoint's components and CI functions loaded."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise SPDError(f"{run_dir} is not a run dir (no config.yaml); pass the directory a decomposition wrote")
    module = import_script(run_script(run_dir))
    cfg, build = load_config(config_class(module), config), module.build
    device_here(cfg, run_dir)
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
