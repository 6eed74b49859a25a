"""Bare training-step time of the working tree's `spd_common` against a git revision's, interleaved.

    python benchmarks/step_bench.py configs/tms_5-2.yaml [--baseline HEAD] [--steps 20] [--rounds 7] [--threads 1]

Timings on a shared machine are noisy, so both versions run in one process, alternating blocks of
`--steps` steps (A, B, A, B, ...) for `--rounds` rounds; the table gives each version's median
ms/step over the rounds and the ratio. A step is what `optimize` does per step without logging:
zero_grad, `training_losses`, backward, Adam step. Both versions start from the same seed and train
on the same batches with their own mask RNG streams; their losses after the run are printed too
(equal for a bit-identical change, close otherwise).
`--profile` instead prints torch.profiler's table for the working tree's step.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import spd_common  # noqa: E402 (needs ROOT on the path)
from spd_common import ComponentModel  # noqa: E402
from spd_config import load_config  # noqa: E402
from spd_run import config_class, import_script, script_for  # noqa: E402


def load_source(src: str, mod_name: str, origin: str):
    spec = importlib.util.spec_from_loader(mod_name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = origin
    sys.modules[mod_name] = mod  # dataclasses look their module up here
    exec(compile(src, origin, "exec"), mod.__dict__)
    return mod


def module_at(rev: str, name: str = "spd_common",
              helpers: tuple[str, ...] = ("spd_config", "spd_kernels", "spd_layers", "spd_run")):
    """spd_common.py as it was at git revision `rev`, imported as a separate module, with the
    revision's own versions of the files it imports (where it has them) in place while it loads."""
    def show(module: str) -> str | None:
        proc = subprocess.run(["git", "show", f"{rev}:{module}.py"], cwd=ROOT, capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else None

    tag = rev.replace("~", "_").replace("^", "_")
    saved = {m: sys.modules.get(m) for m in helpers}
    try:
        for m in helpers:
            if (src := show(m)) is not None:
                sys.modules[m] = load_source(src, f"{m}_at_{tag}", f"<{rev}:{m}.py>")
        return load_source(show(name), f"{name}_at_{tag}", f"<{rev}:{name}.py>")
    finally:
        for m, mod in saved.items():
            sys.modules[m] = mod


class Runner:
    """One version of spd_common training one freshly built model of the experiment."""

    def __init__(self, sc, script, cfg):
        versions_class = sc.ComponentModel

        class VersionsModel:  # build() makes its model with this version's class (old ones lack from_config)
            @staticmethod
            def from_config(target, spd):
                return versions_class(target, spd.modules, spd.tied, spd.ci_fn, spd.ci_hidden)

        # build() reaches ComponentModel through the script or Experiment.fresh (spd_common): this version's in both
        script.ComponentModel = spd_common.ComponentModel = VersionsModel
        try:
            exp = script.build(cfg)
        finally:
            script.ComponentModel = spd_common.ComponentModel = ComponentModel
        self.sc, self.cfg, self.exp, self.step_i = sc, cfg.spd, exp, 0
        params = list(exp.model.components.parameters()) + list(exp.model.ci_fns.parameters())
        self.opt = torch.optim.Adam(params, lr=cfg.spd.lr)
        self.last = {}
        self.rng = torch.get_rng_state()  # masks come from the global RNG: each runner keeps its own stream

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        losses = self.sc.training_losses(self.exp.model, self.cfg, self.exp.train_batch(self.step_i),
                                         self.step_i / self.cfg.steps, self.exp.output_fn)
        losses["total"].backward()
        self.opt.step()
        self.step_i += 1
        self.last = {k: v.item() for k, v in losses.items()}

    def timed(self, n: int) -> float:
        torch.set_rng_state(self.rng)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        dt = (time.perf_counter() - t0) / n * 1000
        self.rng = torch.get_rng_state()
        return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/tms_5-2.yaml")
    ap.add_argument("--baseline", default="HEAD", help="git revision of the baseline spd_common.py")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=7, help="A/B rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="profile the working tree's step instead")
    ap.add_argument("overrides", nargs="*", default=[], help="key.sub=value config overrides")
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    script = import_script(ROOT / script_for(args.config))
    cfg = load_config(config_class(script), args.config, args.overrides)
    if args.profile:
        r = Runner(spd_common, script, cfg)
        for _ in range(5):
            r.step()
        with torch.profiler.profile() as prof:
            for _ in range(args.steps):
                r.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        return
    runners = {"baseline": Runner(module_at(args.baseline), script, cfg), "new": Runner(spd_common, script, cfg)}
    for r in runners.values():  # warm-up: allocator, first-call costs
        r.timed(3)
    times = {k: [] for k in runners}
    for _ in range(args.rounds):
        for k, r in runners.items():
            times[k].append(r.timed(args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.config}: {args.threads} thread(s), {args.rounds} rounds of {args.steps} steps, interleaved")
    for k, v in times.items():
        print(f"  {k:<9} median {med[k]:7.2f} ms/step   rounds: {' '.join(f'{t:.1f}' for t in v)}")
    print(f"  new / baseline = {med['new'] / med['baseline']:.3f}")
    for k, r in runners.items():
        print(f"  {k:<9} losses after {r.step_i} steps: " + "  ".join(f"{n}={v:.6g}" for n, v in r.last.items()))


if __name__ == "__main__":
    main()
