"""Harvest per-subcomponent statistics of a finished (or running) decomposition from held-out batches.

    python analysis/harvest.py RUN_DIR [--batches N] [--top-k K] [--effect-positions P] [--out DIR]

Streams N held-out batches (`exp.eval_batch(i)`, i < N) through the run's decomposed model and, per
module and subcomponent c, records how often it fires (CI > spd.ci_threshold), its mean CI and its
weight norm ||U[:, c]|| ||V[c]||. A conv module's CI, one per output location, counts per image as its max
over locations (`ComponentModel.per_input`): c fires on an image when it fires somewhere in it. A conv
module also gets per-location statistics, which tell where in an image c fires:

  location maps of alive c, (H_out, W_out) each: its mean CI at each output location over the images, and
      its firing density there (the share of images with CI > threshold at that location);
  coverage[c] = the share of an image's H_out W_out locations where c fires, averaged over the images where
      it fires at all (sum of the density map / (H_out W_out density[c])). It tells a local detector (low:
      c fires on a part of each image, e.g. the shape or an edge of it) from a global one (near 1: it fires
      nearly everywhere, shape and background alike); `LOCAL_COVERAGE` is the line between them that the
      report and shapes_decomposition.py use;
  spread[c] = the share of locations where c fires on at least SPREAD_MIN_SHARE of the images. A local c
      with low spread fires in a fixed region (e.g. near the border); with high spread its region moves
      with the image content (shapes sit at random positions).

For language models (the experiment has a tokenizer) it also records, per alive subcomponent, the top-k
activating contexts and its next-token effects:

  next-token effect of c in module n = mean over the positions p where c fires (up to --effect-positions
  of them, its highest-CI ones) of
      softmax(logits at p | n masked with CI, c's mask 0 at p) - softmax(logits at p | n masked with CI)
  with every other module running the target and n's delta component (W - UV) on, so that the only
  difference between the two forward passes is c's own contribution at p. Tokens whose probability drops
  most are the ones c promotes; those that rise most, the ones it suppresses. (Probabilities, not
  log-probs: the changes sum to 0 at every position, and a flatter distribution without c does not read
  as c suppressing every rare token.)
  Cost: per module and batch, one forward (keeping its KV cache), then one one-token forward per (c, p)
  on that cache, batched: ablating at p changes nothing before p. It prints its progress and time left.

Writes OUT/harvest.json (OUT defaults to RUN_DIR/analysis) and prints its path as the last line:

  {"run_dir": str, "checkpoint": str (the checkpoint harvested), "n_batches": N, "top_k": K,
   "effect_positions": P, "ci_threshold": float,
   "n_examples": int (rows of CI per module: examples (images), or tokens for LMs),
   "lm": bool,
   "modules": {module name: {
       "C": int,
       "density": [C floats],      fraction of examples/tokens with CI > ci_threshold
       "mean_ci": [C floats],      mean of CI clipped to [0, 1]
       "weight_norm": [C floats],  ||U[:, c]|| ||V[c]||
       "alive": [ints],            the c with density > 0, densest first
       "locations": {              conv modules only (see above)
           "shape": [H_out, W_out],
           "coverage": [C floats], "spread": [C floats],
           "mean_ci": {str(c): [[H_out x W_out floats]]},   for every alive c
           "density": {str(c): [[H_out x W_out floats]]}},  for every alive c
       "lm": {str(c): {            LMs only, for every alive c
           "contexts": [{"tokens": [str], "pos": int (index of the firing token in tokens), "ci": float,
                         "token_ci": [float] (c's CI on each of tokens)}],
                                   top-k by CI, highest first; up to CONTEXT_BEFORE tokens before, CONTEXT_AFTER after
           "promotes": [{"token": str, "delta_prob": float}],   top-k, most negative change first
           "suppresses": [{"token": str, "delta_prob": float}]  top-k, most positive change first
       }}}}}
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from spd_common import ComponentModel, Experiment  # noqa: E402
from spd_config import SPDError  # noqa: E402
from spd_run import checkpoint_paths, load_run, run_main  # noqa: E402

CONTEXT_BEFORE, CONTEXT_AFTER = 10, 4  # tokens shown around a firing token
LOCAL_COVERAGE = 0.5  # a conv subcomponent firing on at most this share of an image's locations is local
SPREAD_MIN_SHARE = 0.05  # spread counts the locations where c fires on at least this share of the images


def context_window(tokens: Tensor, pos: int, tokenizer: Any, before: int = CONTEXT_BEFORE,
                   after: int = CONTEXT_AFTER) -> tuple[list[str], int]:
    """Decoded tokens of one sequence (seq,) around `pos`, and the index of tokens[pos] among them."""
    start = max(pos - before, 0)
    window = tokens[start: pos + after + 1].tolist()
    return [tokenizer.decode([t]) for t in window], pos - start


def merge_top_k(best: tuple[Tensor, Tensor] | None, values: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Running top-k per column: (values (k, C), index (k, C)) of the best of `best` and the new rows."""
    if best is not None:
        values, index = torch.cat([best[0], values]), torch.cat([best[1], index])
    top = values.topk(min(k, values.shape[0]), dim=0)
    return top.values, index.gather(0, top.indices)


def location_counts(ci: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """A conv module's CI (images, H_out, W_out, C) summed over the images at each location: CI clipped to
    [0, 1], and the number of images with CI > threshold there; each (H_out, W_out, C)."""
    return ci.clamp(0, 1).sum(0), (ci > threshold).sum(0).float()


def locality(fired_at: Tensor, fired: Tensor, n_images: int) -> tuple[Tensor, Tensor]:
    """coverage (C,) and spread (C,) as defined in the module docstring, from the firing counts per location
    fired_at (H_out, W_out, C) and per image fired (C,) (images where c fires somewhere) over n_images."""
    coverage = fired_at.sum((0, 1)) / (fired_at[..., 0].numel() * fired.clamp_min(1))
    spread = (fired_at >= SPREAD_MIN_SHARE * n_images).float().mean((0, 1))
    return coverage, spread


def grid(m: Tensor) -> list[list[float]]:
    """A map (H_out, W_out) as nested lists, 3 decimals."""
    return [[round(v, 3) for v in row] for row in m.tolist()]


def cache_keyword(target: torch.nn.Module) -> str:
    """What a transformers causal LM calls its KV cache argument (and output): `cache` from v5, before it
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(target).forward).parameters else "past_key_values"


@torch.no_grad()
def next_token_effects(model: ComponentModel, output_fn, x: Tensor, name: str, ci: Tensor, alive: list[int],
                       threshold: float, per_component: int = 16, chunk: int = 256, progress=None
                       ) -> dict[int, tuple[Tensor, int]]:
    """Per alive c that fires in batch x (batch, seq): the sum over its firing positions p (its
    `per_component` highest-CI ones) of the change in next-token probabilities (vocab,) at p when c's mask
    goes from its CI to 0 at p alone (module `name` alone masked, delta on), and the number of those p.

    Cost: one forward of x (the CI-masked baseline, keeping its KV cache), then one one-token forward per
    (c, p), `chunk` at a time. Ablating at p alone changes nothing before p, so rerunning position p on the
    baseline's cached keys and values of the positions before it (those at and after p masked out) gives
    the ablated model's prediction at p exactly. `progress(done, total)` is called after each chunk."""
    cache_kw = cache_keyword(model.target)
    delta = {name: torch.ones(ci.shape[:-1], device=ci.device)}
    with model.masked({name: ci}, delta):  # the CI-masked baseline, shared by the module's subcomponents
        out = model(input_ids=x, use_cache=True)
    base, cache = output_fn(out).float().softmax(-1), getattr(out, cache_kw)
    queries = []  # (c, b, p): c ablated at position p of sequence b
    for c in alive:
        b, p = (ci[..., c] > threshold).nonzero(as_tuple=True)
        top = ci[b, p, c].argsort(descending=True)[:per_component]
        queries += [(c, int(b[i]), int(p[i])) for i in top]
    seq = x.shape[1]
    effects: dict[int, tuple[Tensor, int]] = {}
    for start in range(0, len(queries), chunk):
        c, b, p = (torch.tensor(v, device=x.device) for v in zip(*queries[start:start + chunk]))
        cached = copy.deepcopy(cache)
        cached.batch_select_indices(b)
        visible = torch.arange(seq + 1, device=x.device)
        attention = ((visible < p[:, None]) | (visible == seq)).long()  # the positions before p, and p itself
        ablated = ci[b, p].unsqueeze(1).clone()  # (n, 1, C)
        ablated[torch.arange(len(c)), 0, c] = 0.0
        with model.masked({name: ablated}, {name: torch.ones(len(c), 1, device=x.device)}):
            logits = output_fn(model(input_ids=x[b, p][:, None], attention_mask=attention, position_ids=p[:, None],
                                     use_cache=True, **{cache_kw: cached}))
        change = (logits[:, -1].float().softmax(-1) - base[b, p]).cpu()  # one copy per chunk, not per row
        for i, comp in enumerate(c.tolist()):
            total, n = effects.get(comp, (0, 0))
            effects[comp] = (total + change[i], n + 1)
        if progress is not None:
            progress(min(start + chunk, len(queries)), len(queries))
    return effects


def token_list(tokenizer: Any, delta: Tensor, k: int, largest: bool) -> list[dict]:
    top = delta.topk(k, largest=largest)
    return [{"token": tokenizer.decode([int(t)]), "delta_prob": round(v, 5)}
            for v, t in zip(top.values.tolist(), top.indices.tolist())]


def lm_details(model: ComponentModel, exp: Experiment, batches: list[Tensor], cis: list[dict[str, Tensor]], name: str,
               alive: list[int], best: tuple[Tensor, Tensor], threshold: float, top_k: int,
               effect_positions: int) -> dict[str, dict]:
    """Top contexts and next-token effects of each alive subcomponent of one module (see the docstring), the
    effects on up to `effect_positions` firing positions per subcomponent (its highest-CI ones per batch)."""
    seq = batches[0].shape[1]
    per_batch = batches[0].numel()
    sums, counts = dict.fromkeys(alive, 0), dict.fromkeys(alive, 0)
    started, shown = time.time(), [time.time()]

    def progress(b: int, done: int, total: int) -> None:  # a line every 10 s, with the time left
        if time.time() - shown[0] > 10:
            shown[0], spent = time.time(), time.time() - started
            left = spent / (b + done / total) * (len(batches) - b - done / total)
            print(f"  {name}: next-token effects, batch {b + 1}/{len(batches)}, {done}/{total} one-token forwards; "
                  f"about {left:.0f} s left for this module", flush=True)

    for b, (x, ci) in enumerate(zip(batches, cis)):
        for c, (s, k) in next_token_effects(model, exp.output_fn, x, name, ci[name], alive, threshold,
                                            -(-effect_positions // len(batches)),
                                            progress=lambda done, total: progress(b, done, total)).items():
            sums[c], counts[c] = sums[c] + s, counts[c] + k
    details = {}
    for c in alive:
        contexts = []
        for value, flat in zip(*(t[:, c].tolist() for t in best)):
            if value <= threshold:
                break
            b, row = divmod(flat, per_batch)
            tokens, pos = context_window(batches[b].reshape(-1, seq)[row // seq].cpu(), row % seq, exp.tokenizer)
            start = row % seq - pos
            token_ci = cis[b][name].reshape(-1, seq, cis[b][name].shape[-1])[row // seq, start:start + len(tokens), c]
            contexts.append({"tokens": tokens, "pos": pos, "ci": round(value, 4),
                             "token_ci": [round(v, 3) for v in token_ci.clamp(0, 1).tolist()]})
        mean = sums[c] / counts[c]
        details[str(c)] = {"contexts": contexts, "promotes": token_list(exp.tokenizer, mean, top_k, largest=False),
                           "suppresses": token_list(exp.tokenizer, mean, top_k, largest=True)}
    return details


@torch.no_grad()
def harvest(run_dir: Path, out: Path, n_batches: int = 4, top_k: int = 8, loaded: tuple | None = None,
            effect_positions: int = 16) -> Path:
    """Compute the statistics above on the run's first `n_batches` held-out batches; write out/harvest.json.
    `loaded`: the run's (cfg, Experiment) when the caller has loaded it already."""
    cfg, exp = loaded or load_run(run_dir)
    model, threshold = exp.model, cfg.spd.ci_threshold
    is_lm = exp.tokenizer is not None
    batches = [exp.input_fn(exp.eval_batch(i)) for i in range(n_batches)]
    fired = {n: torch.zeros(C) for n, C in model.C.items()}
    ci_sum = {n: torch.zeros(C) for n, C in model.C.items()}
    best: dict[str, tuple[Tensor, Tensor] | None] = {n: None for n in model.names}
    ci_at: dict[str, Tensor] = {}  # conv modules: summed over images per location, (H_out, W_out, C)
    fired_at: dict[str, Tensor] = {}
    cis = []
    n_rows = 0
    for b, x in enumerate(batches):
        ci = model.ci_of(x)
        for n in (n for n in model.names if model.decomposed[n].is_conv):
            s, f = location_counts(ci[n].float().cpu(), threshold)
            ci_at[n], fired_at[n] = ci_at.get(n, 0) + s, fired_at.get(n, 0) + f
        for n, g in model.per_input(ci).items():
            rows = g.flatten(0, -2).float().cpu()  # (examples or tokens, C); a conv's max over locations
            fired[n] += (rows > threshold).sum(0)
            ci_sum[n] += rows.clamp(0, 1).sum(0)  # masks use a lower-leaky CI that dips below 0
            if is_lm:  # index b * rows + row: which batch, and which token of it
                top = rows.topk(min(top_k, rows.shape[0]), dim=0)
                best[n] = merge_top_k(best[n], top.values, top.indices + b * rows.shape[0], top_k)
        n_rows += rows.shape[0]
        if is_lm:  # kept for the next-token effects
            cis.append(ci)

    modules: dict[str, dict] = {}
    if is_lm:
        n_alive = sum(int((fired[n] > 0).sum()) for n in model.names)
        print(f"harvest: CI of {n_rows} tokens done; next-token effects of {n_alive} alive subcomponents in "
              f"{len(model.names)} modules, up to {effect_positions} positions each", flush=True)
    for n in model.names:
        U, V = model.decomposed[n].components.factors()
        density = fired[n] / n_rows
        alive = [c for c in density.argsort(descending=True).tolist() if density[c] > 0]
        modules[n] = {"C": model.C[n], "density": density.tolist(), "mean_ci": (ci_sum[n] / n_rows).tolist(),
                      "weight_norm": (U.norm(dim=0) * V.norm(dim=1)).cpu().tolist(), "alive": alive}
        if n in fired_at:
            coverage, spread = locality(fired_at[n], fired[n], n_rows)
            modules[n]["locations"] = {"shape": list(fired_at[n].shape[:2]), "coverage": coverage.tolist(),
                                       "spread": spread.tolist(),
                                       "mean_ci": {str(c): grid(ci_at[n][..., c] / n_rows) for c in alive},
                                       "density": {str(c): grid(fired_at[n][..., c] / n_rows) for c in alive}}
        if is_lm:
            modules[n]["lm"] = lm_details(model, exp, batches, cis, n, alive, best[n], threshold, top_k,
                                          effect_positions)
    result = {"run_dir": str(run_dir), "checkpoint": checkpoint_paths(run_dir / "checkpoints")[-1].name,
              "n_batches": n_batches, "top_k": top_k, "effect_positions": effect_positions, "ci_threshold": threshold,
              "n_examples": n_rows,
              "lm": is_lm, "modules": modules}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "harvest.json"
    path.write_text(json.dumps(result))
    return path


def harvested(run_dir: Path, out: Path, loaded: tuple | None = None) -> dict:
    """out/harvest.json as a dict, harvested first (default settings) when it is missing or older than the
    run's newest checkpoint: what the report, the explorer and autointerp read. `loaded` as for harvest."""
    if not (run_dir / "config.yaml").is_file():
        raise SPDError(f"{run_dir} is not a run dir (no config.yaml); pass the directory a decomposition wrote")
    ckpts = checkpoint_paths(run_dir / "checkpoints")
    path = out / "harvest.json"
    if not path.exists() or (ckpts and path.stat().st_mtime < ckpts[-1].stat().st_mtime):
        print(f"harvesting {run_dir} into {path} first (missing, or older than the newest checkpoint); it prints "
              f"its progress and the time left (to run it alone: python analysis/harvest.py {run_dir})", flush=True)
        harvest(run_dir, out, loaded=loaded)
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a decomposition's run dir (holds config.yaml and checkpoints/)")
    ap.add_argument("--batches", type=int, default=4, help="held-out batches to stream (default 4)")
    ap.add_argument("--top-k", type=int, default=8, help="contexts and tokens kept per subcomponent (default 8)")
    ap.add_argument("--effect-positions", type=int, default=16,
                    help="LMs: firing positions per subcomponent its next-token effects average over (default 16)")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default RUN_DIR/analysis)")
    args = ap.parse_args()
    if min(args.batches, args.top_k, args.effect_positions) < 1:
        raise SPDError(f"--batches {args.batches} --top-k {args.top_k} --effect-positions {args.effect_positions}: "
                       "each must be at least 1")
    print(harvest(args.run_dir, args.out or args.run_dir / "analysis", args.batches, args.top_k,
                  effect_positions=args.effect_positions))


if __name__ == "__main__":
    run_main(main)
