"""Expand a sweep YAML into numbered runs, and run them.

    python slurm/sweep.py SWEEP.yaml --list                 # the runs, numbered 0..N-1
    python slurm/sweep.py SWEEP.yaml --index I [--out DIR]  # run I (what each task of slurm/sweep.sh does)
    python slurm/sweep.py SWEEP.yaml --local [--out DIR]    # every run here, one after another
    python slurm/sweep.py SWEEP.yaml ... key.sub=value ...  # appended to every run (e.g. spd.steps=100)

A sweep YAML has one section per experiment, named after its config (`tms_5-2:` runs configs/tms_5-2.yaml
with the one experiment script whose config class reads it; `script: my_decomposition.py` in a section
names the script instead), plus an optional `global:` section that applies to every experiment:

    global:
      spd.steps: 2000                 # a fixed value (a YAML list is a list value: spd.ci_hidden: [32, 32])
      spd.seed: {values: [0, 1]}      # a grid axis: one run per combination of all axes' values
    tms_5-2:
      spd.importance_minimality_coeff: {values: [1e-3, 3e-3]}
    tms_40-10:                        # a list of grids: their runs one after another
      - {spd.lr: 1e-3}
      - {spd.lr: 3e-3, spd.steps: 4000}

Keys are dotted (`spd.seed`) or nested (`spd: {seed: 0}`). An experiment's own value or axis replaces
a global one of the same key. Run I goes to DIR/I-<config name> (DIR defaults to
runs/sweeps/<sweep name>/<SLURM_ARRAY_JOB_ID, else a timestamp>) through slurm/launch.py, so rerunning
continues unfinished runs and skips finished ones; its overrides are recorded there in launch.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from launch import ROOT, launch  # launch puts ROOT on sys.path for spd_run
from spd_config import SPDError
from spd_run import run_main, script_for


@dataclass
class Run:
    script: str
    config: str
    overrides: list[str]

    def name(self, index: int) -> str:
        return f"{index}-{Path(self.config).stem}"


def flatten(section: dict, prefix: str = "") -> dict[str, Any]:
    """Nested keys to dotted ones; a `{values: [...]}` grid axis is a leaf."""
    out: dict[str, Any] = {}
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        items = flatten(value, dotted + ".") if isinstance(value, dict) and set(value) != {"values"} \
            else {dotted: value}
        for k, v in items.items():
            if k in out:
                raise SPDError(f"sweep key '{k}' is given twice (dotted and nested?)")
            out[k] = v
    return out


def grid(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the grid axes' values, the last axis varying fastest; fixed values in each."""
    axes = []
    for key, value in params.items():
        if isinstance(value, dict):  # flatten leaves only {values: ...} as a dict
            value = value["values"]
            if not isinstance(value, list) or not value:
                raise SPDError(f"sweep key '{key}': values must be a non-empty list, got {value!r}")
            axes.append(value)
        else:
            axes.append([value])
    return [dict(zip(params, combo)) for combo in itertools.product(*axes)]


def override(key: str, value: Any) -> str:
    """`key=value`, with the value written so that the config loader's YAML parsing gives it back."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def expand(sweep: dict, extra: list[str] = ()) -> list[Run]:
    """The runs of a parsed sweep YAML, in file order; `extra` overrides are appended to each."""
    if not isinstance(sweep, dict):
        raise SPDError("a sweep YAML maps experiment names (and optionally 'global') to parameters")
    common = flatten(sweep.get("global") or {})
    runs = []
    for name, section in sweep.items():
        if name == "global":
            continue
        config = f"configs/{name}.yaml"
        if not (ROOT / config).is_file():
            raise SPDError(f"sweep section '{name}': no {config}; name sections after configs/*.yaml or 'global'")
        for part in section if isinstance(section, list) else [section]:
            if not isinstance(part, (dict, type(None))):
                raise SPDError(f"sweep section '{name}': expected a mapping of parameters or a list of them, "
                               f"got {part!r}")
            params = flatten(part or {})
            script = params.pop("script", None) or script_for(ROOT / config)
            for point in grid(common | params):
                runs.append(Run(script, config, [override(k, v) for k, v in point.items()] + list(extra)))
    if not runs:
        raise SPDError("the sweep has no experiment sections (e.g. 'tms_5-2:'), so no runs")
    return runs


def load_sweep(path: Path, extra: list[str] = ()) -> list[Run]:
    if not path.is_file():
        raise SPDError(f"sweep file {path} not found")
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SPDError(f"{path}: malformed YAML: {e}") from None
    try:
        return expand(sweep, extra)
    except SPDError as e:
        raise SPDError(f"{path}: {e}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="sweep YAML, e.g. configs/sweep_tms.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides appended to every run")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print the runs, numbered")
    what.add_argument("--index", type=int, help="run number I")
    what.add_argument("--local", action="store_true", help="run them all here, one after another")
    ap.add_argument("--out", help="sweep dir (default runs/sweeps/<sweep name>/<array job id or timestamp>)")
    args = ap.parse_intermixed_args()
    sweep = Path(args.sweep)
    runs = load_sweep(sweep, args.overrides)
    if args.list:
        for i, run in enumerate(runs):
            print(f"{i}\t{shlex.join([run.script, run.config, *run.overrides])}")
        print(f"{len(runs)} runs: sbatch --array=0-{len(runs) - 1} slurm/sweep.sh "
              f"{shlex.join([args.sweep, *args.overrides])}")
        return
    if args.index is not None and not 0 <= args.index < len(runs):
        raise SPDError(f"--index {args.index}: {sweep} has {len(runs)} runs, numbered 0 to {len(runs) - 1}")
    out = Path(args.out or Path("runs/sweeps") / sweep.stem /
               os.environ.get("SLURM_ARRAY_JOB_ID", datetime.now().strftime("%Y%m%d-%H%M%S")))

    def run(i: int) -> int:
        r = runs[i]
        return launch(r.script, r.config, r.overrides, out / r.name(i), {"sweep": args.sweep, "index": i})

    if args.index is not None:
        sys.exit(run(args.index))
    failed = [f"{i} (exit code {rc})" for i in range(len(runs)) if (rc := run(i)) != 0]
    if failed:
        raise SPDError(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}; their output is above")
    print(f"{len(runs)} runs done in {out}")

if __name__ == "__main__":
    run_main(main)
