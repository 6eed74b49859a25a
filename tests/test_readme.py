"""The README and docs/ stay true: every command they show still runs, as far as that can be checked without
training anything, and the README stays a user's guide.

Commands come from the ```bash blocks of README.md and docs/*.md and from their inline code spans that start
with python, torchrun, bash or sbatch. For each one, cheaply:
  - the script (or `python -m` module, `sbatch` job file, `bash` script) exists;
  - every `*.yaml` argument exists, and a `configs/` one loads with the config class of the experiment that
    runs it (the command's own `*_decomposition.py` or `sae_baseline.py`, else `spd_run.script_for`),
    with the command's `key.sub=value` overrides applied; an SAE config's `experiment:` config loads too;
  - a sweep YAML expands (as `python slurm/sweep.py SWEEP --list` does) and each of its runs' configs loads;
  - a tool in analysis/, benchmarks/ or slurm/ answers `--help` with exit code 0; a shell script passes `bash -n`.
Placeholders (CONFIG.yaml, RUN_DIR, N, <time>, ..., `[optional parts]`) are not checked.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
TEST_COMMAND = 'pip install -r requirements.txt && python -m pytest -m "not slow"'  # what .ci/run runs
FIRST_RUN = "pip install -r requirements.txt && python tms_decomposition.py configs/tms_5-2.yaml"
MAX_README_LINES = 350

COMMANDS = ("python", "python3", "torchrun", "bash", "sbatch", "pip")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")  # a leading VAR=value
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+)?$|[<>]|\.\.\.|^\$|\*")  # CONFIG.yaml, RUN_DIR, N, <time>, ...


# ------------------------------------------------------------------------------------------------
# Extracting commands
# ------------------------------------------------------------------------------------------------
def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def commands(text: str) -> list[str]:
    """The shell commands of a markdown text: each line of its ```bash blocks (continuations joined,
    comments dropped, `&&` chains split), and the inline code spans that start with a command."""
    found = []
    for block in bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(re.sub(r"(^|\s)#.*$", "", line))
    spans = re.findall(r"(?<!`)`([^`]+)`(?!`)", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    for span in spans:
        span = " ".join(span.split())
        words = span.split()
        while words and ENV.match(words[0]):
            words = words[1:]
        if words and words[0] in COMMANDS and len(words) > 1:
            found.append(span)
    return [part.strip() for cmd in found for part in cmd.split("&&") if part.strip()]


def tokens(command: str) -> list[str]:
    """The command's words, less leading VAR=value assignments and `[optional parts]`."""
    command = re.sub(r"(^|(?<=\s))\[[^\[\]]*\]", " ", command)
    words = shlex.split(command)
    while words and ENV.match(words[0]):
        words = words[1:]
    return words


def placeholder(word: str) -> bool:
    return bool(PLACEHOLDER.search(word))


def overrides(words: list[str]) -> list[str]:
    """The `key.sub=value` words (also those after --set), placeholders (KEY=VALUE, key=A) left out."""
    out = []
    for w in words:
        if w.startswith("-") or "=" not in w:
            continue
        key, value = w.split("=", 1)
        if not placeholder(key) and not re.fullmatch(r"[A-Z][A-Z0-9_]*", value):
            out.append(w)
    return out


# ------------------------------------------------------------------------------------------------
# Checking one command
# ------------------------------------------------------------------------------------------------
@functools.cache
def exit_code(*argv: str) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return p.returncode, (p.stderr or p.stdout).strip()[-500:]


def experiment_class(script: str | None, config: Path) -> type:
    from spd_run import config_class, import_script, script_for

    if script is None or not (script.endswith("_decomposition.py") or Path(script).name == "sae_baseline.py"):
        script = script_for(config)
    return config_class(import_script(ROOT / script))


def check_config(script: str | None, config: str, extra: list[str]) -> list[str]:
    """Problems loading `config` (relative to the repository root) as `script` runs it, with `extra` overrides."""
    from spd_config import SPDError, load_config
    from spd_run import config_class, import_script, script_for

    path = ROOT / config
    if not path.is_file():
        return [f"{config} does not exist"]
    if not config.startswith("configs/"):
        return []
    try:
        cfg = load_config(experiment_class(script, path), path, extra)
        if hasattr(cfg, "experiment") and hasattr(cfg, "dictionary"):  # an SAE config: its experiment too
            exp = cfg.experiment_script or script_for(ROOT / cfg.experiment)
            load_config(config_class(import_script(ROOT / exp)), ROOT / cfg.experiment, cfg.experiment_overrides)
    except SPDError as e:
        return [f"{config} {' '.join(extra)}: {e}"]
    return []


def check_sweep(sweep: str, extra: list[str]) -> list[str]:
    """A sweep YAML expands (as `slurm/sweep.py SWEEP --list` does) and each of its runs' configs loads."""
    from spd_config import SPDError
    from spd_run import import_script

    sys.path.insert(0, str(ROOT / "slurm"))  # sweep.py imports its neighbour launch.py
    try:
        runs = import_script(ROOT / "slurm/sweep.py").load_sweep(ROOT / sweep, extra)
    except SPDError as e:
        return [f"{sweep}: {e}"]
    finally:
        sys.path.remove(str(ROOT / "slurm"))
    return [p for run in runs for p in check_config(run.script, run.config, run.overrides)]


def check_help(path: str) -> list[str]:
    if path.endswith(".sh") or path.endswith(".sbatch"):
        rc, out = exit_code("bash", "-n", path)
        return [] if rc == 0 else [f"bash -n {path} exits {rc}: {out}"]
    rc, out = exit_code(sys.executable, path, "--help")
    return [] if rc == 0 else [f"python {path} --help exits {rc}: {out}"]


def check_script(script: str, args: list[str]) -> list[str]:
    """A script and its arguments: it exists; its configs load; a tool answers --help."""
    if placeholder(script):
        return []
    if not (ROOT / script).is_file():
        return [f"{script} does not exist"]
    problems = []
    if script == "slurm/launch.py" and args and not placeholder(args[0]):  # launch.py SCRIPT CONFIG ...
        problems += check_help(script)
        return problems + check_script(args[0], args[1:])
    if script.startswith(("analysis/", "benchmarks/", "slurm/")):
        problems += check_help(script)
    extra = overrides(args)
    for a in args:
        if not a.endswith(".yaml") or placeholder(a):
            continue
        if script in ("slurm/sweep.py", "slurm/sweep.sh", "analysis/method_sweep.py"):  # sweep YAMLs
            problems += check_sweep(a, extra)
        else:
            problems += check_config(script if script.endswith(".py") else None, a, extra)
    return problems


def check(command: str) -> list[str]:
    """What is wrong with `command`, as far as it can be told without running it."""
    words = tokens(command)
    if not words:
        return []
    prog, args = words[0], words[1:]
    if prog == "pip":
        reqs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-r"]
        return [f"{r} does not exist" for r in reqs if not (ROOT / r).is_file()]
    if prog in ("python", "python3"):
        if not args:
            return []
        if args[0] == "-m":
            module = args[1]
            local = ROOT / module.replace(".", "/")
            if (local.with_suffix(".py")).is_file() or (local / "__init__.py").is_file():
                return []
            return [] if importlib.util.find_spec(module) else [f"no module {module}"]
        return check_script(args[0], args[1:])
    if prog == "torchrun":
        scripts = [i for i, a in enumerate(args) if a.endswith(".py")]
        if not scripts:  # a fragment in prose (`torchrun --nproc 1`) or elided (`torchrun ... --resume RUN_DIR`)
            return []
        return check_script(args[scripts[0]], args[scripts[0] + 1:])
    if prog == "sbatch":
        jobs = [i for i, a in enumerate(args) if a.startswith("slurm/")]
        if not jobs:
            return [] if any(placeholder(a) for a in args) else ["sbatch without a slurm/ job file"]
        job, rest = args[jobs[0]], args[jobs[0] + 1:]
        if not (ROOT / job).is_file():
            return [f"{job} does not exist"]
        problems = check_help(job)
        if job == "slurm/run.sbatch" and rest:  # run.sbatch SCRIPT CONFIG [overrides]
            return problems + check_script(rest[0], rest[1:])
        return problems + check_script(job, rest)
    if prog == "bash":
        if not args or placeholder(args[0]):
            return []
        if not (ROOT / args[0]).is_file():
            return [f"{args[0]} does not exist"]
        return check_help(args[0])
    return []  # tail, salloc, ...: nothing of ours to check


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------
def all_commands() -> list[tuple[str, str]]:
    seen, out = set(), []
    for path in [README, *DOCS]:
        for cmd in commands(path.read_text()):
            if cmd not in seen:
                seen.add(cmd)
                out.append((path.relative_to(ROOT).as_posix(), cmd))
    return out


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("where,command", all_commands(), ids=[c[:80] for _, c in all_commands()])
def test_command_still_runs(where, command, at_root):
    problems = check(command)
    assert not problems, f"{where}: `{command}`:\n  " + "\n  ".join(problems)


def test_the_checks_can_fail(at_root):
    """A README naming a missing config, an unknown override, a missing script or a missing tool fails."""
    text = """
```bash
python tms_decomposition.py configs/no_such_config.yaml
python tms_decomposition.py configs/tms_5-2.yaml spd.no_such_key=1
python no_such_decomposition.py configs/tms_5-2.yaml
torchrun --standalone --nproc_per_node 2 tms_decomposition.py configs/no_such_config.yaml
```
and `python analysis/no_such_tool.py RUN_DIR` and `bash benchmarks/no_such.sh`.
"""
    cmds = commands(text)
    assert len(cmds) == 6
    for cmd in cmds:
        assert check(cmd), f"no problem found in `{cmd}`"
    # and the placeholders and optional parts of a usage line pass
    assert not check("python tms_decomposition.py CONFIG.yaml [key.sub=value ...] [--out DIR]")
    assert not check("OMP_NUM_THREADS=1 python tms_decomposition.py configs/tms_5-2.yaml spd.threads=1")


def test_readme_starts_with_the_two_commands():
    first = bash_blocks(README.read_text())[0].splitlines()
    assert first == [FIRST_RUN, TEST_COMMAND]
    assert TEST_COMMAND.split("&& ")[1] in (ROOT / ".ci/run").read_text()  # CI runs exactly that command


def test_readme_is_a_users_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move measurements to docs/"


def test_every_doc_is_linked_from_the_readme():
    assert DOCS, "no docs/*.md"
    links = re.findall(r"\]\(([^)#\s]+)", README.read_text())
    for doc in DOCS:
        assert doc.relative_to(ROOT).as_posix() in links, f"README.md does not link {doc.name}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    for path in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), f"{path.name}: link {target} points to a missing file"
            if anchor and dest.suffix == ".md":
                anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)}
                assert anchor in anchors, f"{path.name}: link {target}: no such heading in {dest.name}"


def test_named_configs_exist():
    for path in [README, *DOCS]:
        for config in set(re.findall(r"configs/[\w./-]+\.yaml", path.read_text())):
            assert (ROOT / config).is_file(), f"{path.name} names {config}, which does not exist"
