"""Reliability: one clear line for every kind of bad input, with existing results left untouched."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tms_decomposition
from spd_common import run_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tms_5-2.yaml")
TINY = ["spd.steps=40", "spd.batch_size=256", "spd.eval_batch_size=256", "spd.checkpoint_every=10",
        "spd.eval_every=15", "spd.log_every=5", "spd.faithfulness_warmup_steps=20", "target.steps=200",
        "target.min_column_norm=0"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tms_decomposition.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A cached target and one uninterrupted reference run, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("shared")
    target = root / "target.pt"
    overrides = [*TINY, f"target.path={target}"]
    proc = run_script([CONFIG, *overrides, "--out", str(root / "ref")], cwd=root)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "target": target, "ref": root / "ref", "overrides": overrides}


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing existing modified
# ------------------------------------------------------------------------------------------------
GOOD = "target: {n_features: 5, n_hidden: 2, path: t.pt}\nspd: {modules: {linear1: 20}}\n"
RUN = ["{cfg}", *TINY, "target.path={target}"]

SETUPS = {  # prepare files in the test's tmp dir before the bad input is tried
    "garbage_target": lambda tmp, sh: (tmp / "garbage.pt").write_bytes(b"not a model"),
    "dir_target": lambda tmp, sh: (tmp / "dir.pt").mkdir(),
    "a_file": lambda tmp, sh: (tmp / "a_file").write_text("x"),
    "malformed": lambda tmp, sh: (tmp / "c.yaml").write_text("target: {n_features: 5\nspd: {}\n"),
    "list": lambda tmp, sh: (tmp / "c.yaml").write_text("- a\n- b\n"),
    "empty": lambda tmp, sh: (tmp / "c.yaml").write_text(""),
    "unknown_top": lambda tmp, sh: (tmp / "c.yaml").write_text(GOOD + "extra: 1\n"),
    "spd_list": lambda tmp, sh: (tmp / "c.yaml").write_text("target: {n_features: 5}\nspd: [1, 2]\n"),
    "no_target": lambda tmp, sh: (tmp / "c.yaml").write_text("spd: {modules: {linear1: 3}}\n"),
}

BAD_INPUTS = [
    # config files
    ("missing_file", None, ["{tmp}/nope.yaml"], r"config file \S+nope.yaml not found; pass the path of a YAML"),
    ("malformed_yaml", "malformed", ["{tmp}/c.yaml"], r"c.yaml: malformed YAML at line 2: .*; fix the file's syntax"),
    ("top_level_list", "list", ["{tmp}/c.yaml"], r"c.yaml: expected a mapping of keys to values at the top level"),
    ("empty_file", "empty", ["{tmp}/c.yaml"], r"c.yaml: missing required key 'target'"),
    ("unknown_top_key", "unknown_top", ["{tmp}/c.yaml"], r"unknown key 'extra'; valid keys at the top level: target"),
    ("spd_not_mapping", "spd_list", ["{tmp}/c.yaml"], r"'spd': expected a mapping of keys to values, got \[1, 2\]"),
    ("missing_section", "no_target", ["{tmp}/c.yaml"], r"missing required key 'target'"),
    # overrides: unknown keys, types, ranges
    ("unknown_spd_key", None, [*RUN, "spd.learning_rate=1"], r"unknown key 'spd.learning_rate'; valid keys at 'spd'"),
    ("unknown_target_key", None, [*RUN, "target.n_feature=5"], r"unknown key 'target.n_feature'"),
    ("int_as_word", None, [*RUN, "spd.steps=ten"], r"\(with overrides\): key 'spd.steps': expected int, got 'ten'"),
    ("int_as_float", None, [*RUN, "spd.steps=1.5"], r"key 'spd.steps': expected int, got 1.5"),
    ("float_as_word", None, [*RUN, "spd.lr=fast"], r"key 'spd.lr': expected float, got 'fast'"),
    ("seed_as_word", None, [*RUN, "spd.seed=abc"], r"key 'spd.seed': expected int, got 'abc'"),
    ("bool", None, [*RUN, "spd.use_delta_component=maybe"], r"key 'spd.use_delta_component': expected bool"),
    ("list", None, [*RUN, "spd.ci_hidden=16"], r"key 'spd.ci_hidden': expected a list of int, got 16"),
    ("literal", None, [*RUN, "spd.ci_fn=transformer"], r"key 'spd.ci_fn': expected one of 'mlp', 'vector_mlp'"),
    ("negative_lr", None, [*RUN, "spd.lr=-1"], r"key 'spd.lr' = -1.0 is out of range: must be > 0 \(peak"),
    ("zero_p", None, [*RUN, "spd.p=0"], r"key 'spd.p' = 0.0 is out of range: must be > 0"),
    ("zero_batch", None, [*RUN, "spd.batch_size=0"], r"key 'spd.batch_size' = 0 is out of range: must be >= 1"),
    ("warmup_frac", None, [*RUN, "spd.lr_warmup_frac=1.5"], r"key 'spd.lr_warmup_frac' = 1.5 .* must be <= 1"),
    ("zero_ckpt_every", None, [*RUN, "spd.checkpoint_every=0"], r"key 'spd.checkpoint_every' = 0 is out of range"),
    ("zero_C", None, [*RUN, "spd.modules.linear1=0"], r"key 'spd.modules.linear1' = 0: C must be >= 1"),
    ("feature_prob", None, [*RUN, "target.feature_probability=0"], r"key 'target.feature_probability' = 0.0 is out"),
    ("anneal_order", None, [*RUN, "spd.p_anneal_start_frac=0.8", "spd.p_anneal_end_frac=0.5"],
     r"'spd': p_anneal_start_frac = 0.8 must be <= p_anneal_end_frac = 0.5"),
    ("no_loss_term", None, [*RUN, "spd.stochastic_recon_coeff=0", "spd.stochastic_recon_layerwise_coeff=null",
                            "spd.importance_minimality_coeff=0"], r"'spd': no loss term is on: set at least one of"),
    ("override_no_equals", None, [*RUN, "spd"], r"override 'spd' must look like key.sub=value"),
    ("override_into_value", None, [*RUN, "spd.lr.x=1"], r"override 'spd.lr.x=1': 'lr' is not a section"),
    ("device_name", None, [*RUN, "spd.device=banana"], r"spd.device = 'banana' is not a device; use auto, cpu"),
    ("device_absent", None, [*RUN, "spd.device=cuda:7"], r"spd.device = 'cuda:7' but this machine has \d CUDA"),
    # the model and its target
    ("pattern_matches_nothing", None, [*RUN, "spd.modules={layers.*.fc1: 5}", "spd.tied={}"],
     r"module pattern 'layers.\*.fc1' matches no nn.Linear/nn.Embedding .* linear1, linear2"),
    ("no_modules", None, [*RUN, "spd.modules={}", "spd.tied={}"], r"no modules to decompose: set spd.modules"),
    ("tied_to_nothing", None, [*RUN, "spd.tied={linear2: linear9}"], r"tied module 'linear9' is not among"),
    ("tied_other_C", None, [*RUN, "spd.modules={linear1: 20, linear2: 10}"], r"'linear2' and 'linear1' need the same"),
    ("target_shape", None, [*RUN, "target.n_features=6"], r"target checkpoint \S+ has shape \[5, 2, 0\] but the "
                                                          r"config asks for \[6, 2, 0\] .* set target.path to a new"),
    ("target_garbage", "garbage_target", [*RUN, "target.path={tmp}/garbage.pt"], r"garbage.pt is unreadable .*retrain"),
    ("target_is_dir", "dir_target", [*RUN, "target.path={tmp}/dir.pt"], r"dir.pt is unreadable \(IsADirectoryError"),
    # the command line and run dirs
    ("no_arguments", None, [], r"the following arguments are required: config.* \(usage: "),
    ("unknown_flag", None, [*RUN, "--frobnicate"], r"unrecognized arguments: --frobnicate \(usage: "),
    ("out_holds_a_run", None, [*RUN, "--out", "{ref}"], r"output dir \S+ref already holds files; choose another --out"),
    ("out_is_a_file", "a_file", [*RUN, "--out", "{tmp}/a_file"], r"--out \S+a_file is a file, not a directory"),
]


def tree_hashes(*roots: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for r in roots for p in sorted(r.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("setup,args,message", [pytest.param(*c[1:], id=c[0]) for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_changes_nothing(shared, tmp_path, monkeypatch, capsys, setup, args, message):
    if setup:
        SETUPS[setup](tmp_path, shared)
    fill = {"{cfg}": CONFIG, "{tmp}": tmp_path, "{ref}": shared["ref"], "{target}": shared["target"]}
    for placeholder, value in fill.items():  # not str.format: YAML overrides hold braces
        args = [a.replace(placeholder, str(value)) for a in args]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tms_decomposition.py", *args])
    before = tree_hashes(shared["root"], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_main(tms_decomposition.main)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines[:-1]), lines
    assert lines[-1].startswith("error: ") and re.search(message, lines[-1]), lines[-1]
    after = tree_hashes(shared["root"], tmp_path)
    assert {p: after.get(p) for p in before} == before  # nothing existing changed or vanished
    new = [p.relative_to(tmp_path).parts for p in after.keys() - before.keys()]
    assert all(parts[0] == "runs" and parts[-1] == "config.yaml" for parts in new), new  # a fresh dir at most
