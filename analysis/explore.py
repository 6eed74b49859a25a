"""A local web app for browsing a decomposition's components: a table, a page per component, and a prompt box.

    python analysis/explore.py RUN_DIR [--port 8000] [--out DIR]

Serves http://127.0.0.1:PORT/ (this machine only) until Ctrl-C; open it in any browser. One page,
analysis/explore.html, with its CSS and JS inline: no build step, no CDN, no network. The standard library's HTTP server is enough for one user
and a handful of JSON endpoints, so there is no web framework to install.

  - Components: every alive subcomponent (fired on the harvested batches) with its module, firing density,
    mean CI, weight norm and, when analysis/autointerp.py has run, its label and detection score;
    searchable (module, index or label) and sortable by any column.
  - A component's page: for language models its top activating contexts from harvest.json, each token
    coloured by the component's CI on it, and the next tokens it promotes and suppresses. For other
    experiments the top activating held-out inputs (token ids, the non-zero features of a sparse vector, or
    an image, RGB in colour), and for vector inputs the CI it gets on each one-hot input. A conv
    subcomponent's page shows where it fires: harvest.json's maps of its mean CI and firing density at
    each output location, its coverage and spread, and beside each top image (ranked by its max CI over
    locations) the map of its CI on that image.
  - Prompt: type a text (LMs), token ids (other sequence models), `3 7:0.5` (feature 3 at 1, feature 7 at
    0.5) or `#k` (the k-th harvested input); the decomposed model runs on the server and the page shows,
    per token, the components with CI > spd.ci_threshold. A link `URL#/prompt/TEXT` runs TEXT on opening.

Reads OUT/harvest.json (OUT defaults to RUN_DIR/analysis), harvesting first when it is missing or older than
the newest checkpoint, and OUT/autointerp.json when present. `--port 0` picks a free port.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from analysis.autointerp import load_labels  # noqa: E402
from analysis.harvest import (CONTEXT_AFTER, CONTEXT_BEFORE, LOCAL_COVERAGE, SPREAD_MIN_SHARE,  # noqa: E402
                              grid, harvested)
from spd_config import SPDError  # noqa: E402
from spd_run import load_run, run_main  # noqa: E402

TOP_K = 12  # top activating inputs per component (non-LM experiments; LMs show harvest.json's)
MAX_PROMPT_TOKENS = 512
MAX_ONE_HOT = 4096  # vector inputs up to this width also get the one-hot sweep


def input_kind(x: Any, tokenizer: Any) -> str:
    """text (an LM with a tokenizer), tokens (integer ids), vector (batch, d), image (batch, ch, h, w), other."""
    if tokenizer is not None:
        return "text"
    if not isinstance(x, Tensor):
        return "other"
    if not x.is_floating_point():
        return "tokens" if x.dim() == 2 else "other"
    return {2: "vector", 4: "image"}.get(x.dim(), "other")


def show_input(x: Tensor, dense: bool) -> dict:
    """One input as the page draws it: the RGB values (h, w, 3) of a colour image, the pixels of another
    image (or of a dense square vector, e.g. 8x8 digits), else a vector's largest non-zero entries
    [[index, value]]. Images are scaled to [0, 1] by their min and max."""
    if x.dim() == 3 and x.shape[0] == 3:  # (RGB, h, w)
        lo, hi = x.min().item(), x.max().item()
        return {"rgb": [[[round(v, 2) for v in px] for px in row]
                        for row in ((x - lo) / max(hi - lo, 1e-9)).permute(1, 2, 0).tolist()]}
    if x.dim() == 3:  # (channels, h, w): drawn in grey, channels averaged
        x = x.float().mean(0)
    elif dense and math.isqrt(x.numel()) ** 2 == x.numel():
        x = x.reshape(math.isqrt(x.numel()), -1)
    if x.dim() == 2:
        lo, hi = x.min().item(), x.max().item()
        return {"pixels": [[round(v, 3) for v in row] for row in ((x - lo) / max(hi - lo, 1e-9)).tolist()]}
    nz = x.nonzero().flatten()
    nz = nz[x[nz].abs().argsort(descending=True)][:16]
    return {"entries": [[int(i), round(float(x[i]), 3)] for i in nz]}


class Explorer:
    """The run, its harvest and labels, and what the endpoints compute from them."""

    def __init__(self, run_dir: Path, out: Path):
        self.cfg, self.exp = load_run(run_dir)
        self.h = harvested(run_dir, out, (self.cfg, self.exp))
        self.out, self.run_dir = out, run_dir
        self._labels: tuple[float, dict] = (-1.0, {})  # (mtime, labels) of out/autointerp.json
        self.model = self.exp.model.eval()
        self.device = next(self.model.parameters()).device
        self.threshold = self.h["ci_threshold"]
        self.lock = threading.Lock()  # one forward pass at a time; the server answers on several threads
        self.kind = input_kind(self.exp.input_fn(self.exp.eval_batch(0)), self.exp.tokenizer)
        self.top: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # module -> top (values, rows) (K, C), rows' CI
        self.maps: dict[str, Tensor] = {}  # conv module -> CI at each location of each input (inputs, H_out, W_out, C)
        self.one_hot: dict[str, Tensor] = {}  # module -> CI on each one-hot input (d, C)
        if self.kind in ("tokens", "vector", "image"):
            self.inputs_and_tops()

    @torch.no_grad()
    def inputs_and_tops(self) -> None:
        """Top activating held-out inputs per component (the harvested batches), and the one-hot sweep."""
        xs = [self.exp.input_fn(self.exp.eval_batch(i)) for i in range(self.h["n_batches"])]
        cis = [self.model.ci_of(x) for x in xs]
        self.X = torch.cat(xs).cpu()
        self.dense = bool((self.X != 0).float().mean() > 0.25)
        for n in self.model.names:
            full = torch.cat([ci[n] for ci in cis]).float().clamp(0, 1).cpu()
            if self.model.decomposed[n].is_conv:  # top images by their max over locations, as harvest counts them
                self.maps[n] = full
            rows = self.model.per_input({n: full})[n].flatten(0, -2)  # (rows, C)
            top = rows.topk(min(TOP_K, rows.shape[0]), dim=0)
            self.top[n] = (top.values, top.indices, rows)
        if self.kind == "vector" and self.X.shape[1] <= MAX_ONE_HOT:
            eye = torch.eye(self.X.shape[1], device=self.device)
            self.one_hot = {n: g.float().clamp(0, 1).cpu() for n, g in self.model.ci_of(eye).items()}

    @property
    def labels(self) -> dict[str, dict[str, dict]]:
        """autointerp.json's labels, read again when it changes: labels written while the explorer runs show up
        on the next page load."""
        path = self.out / "autointerp.json"
        mtime = path.stat().st_mtime if path.is_file() else 0.0
        if mtime != self._labels[0]:
            self._labels = (mtime, load_labels(self.out))
        return self._labels[1]

    def label(self, module: str, c: int) -> dict:
        return self.labels.get(module, {}).get(str(c), {})

    def summary(self) -> dict:
        h = self.h
        return {"run_dir": str(self.run_dir.resolve()), "kind": self.kind, "ci_threshold": self.threshold,
                "n_examples": h["n_examples"], "checkpoint": h["checkpoint"], "labelled": bool(self.labels),
                "modules": {n: {"C": m["C"], "alive": len(m["alive"])} for n, m in h["modules"].items()},
                "width": self.X.shape[1] if self.kind == "vector" else None}

    def components(self) -> list[dict]:
        rows = []
        for n, m in self.h["modules"].items():
            for c in m["alive"]:
                lab = self.label(n, c)
                rows.append({"module": n, "c": c, "density": m["density"][c], "mean_ci": m["mean_ci"][c],
                             "weight_norm": m["weight_norm"][c], "label": lab.get("label"),
                             "score": lab.get("balanced_accuracy")})
        return rows

    def component(self, module: str, c: int) -> dict:
        m = self.h["modules"].get(module)
        if m is None or not 0 <= c < m["C"]:
            raise KeyError(f"no component {module}:{c}")
        d = {"module": module, "c": c, "density": m["density"][c], "mean_ci": m["mean_ci"][c],
             "weight_norm": m["weight_norm"][c], **self.label(module, c)}
        if self.kind == "text":
            d.update(m.get("lm", {}).get(str(c), {}))
        elif module in self.top:
            d["examples"] = self.top_examples(module, c)
            if "locations" in m:
                loc = m["locations"]
                d["locations"] = {"coverage": loc["coverage"][c], "spread": loc["spread"][c],
                                  "local_coverage": LOCAL_COVERAGE, "spread_min_share": SPREAD_MIN_SHARE,
                                  "mean_ci": loc["mean_ci"].get(str(c)),
                                  "density": loc["density"].get(str(c))}
            if module in self.one_hot:
                g = self.one_hot[module][:, c]
                order = g.argsort(descending=True)[:16]
                d["one_hot"] = [[int(i), round(float(g[i]), 3)] for i in order if g[i] > 0.01]
        return d

    def top_examples(self, module: str, c: int) -> list[dict]:
        values, index, rows = self.top[module]
        per_input = rows.shape[0] // self.X.shape[0]  # positions per input: a sequence's tokens, or 1
        out = []
        for v, r in zip(values[:, c].tolist(), index[:, c].tolist()):
            if v <= self.threshold:
                break
            e, pos = divmod(r, per_input)
            if self.kind == "tokens":
                start = max(pos - CONTEXT_BEFORE, 0)
                ids = self.X[e, start: pos + CONTEXT_AFTER + 1].tolist()
                ci = rows[e * per_input + start: e * per_input + start + len(ids), c]
                out.append({"tokens": [f"{t} " for t in ids], "pos": pos - start, "ci": round(v, 4),
                            "token_ci": [round(x, 3) for x in ci.tolist()], "input": e})
            else:
                out.append({"ci": round(v, 4), "input": e, "pos": pos if per_input > 1 else None,
                            **show_input(self.X[e], self.dense)})
                if module in self.maps:  # the CI of c at each location of this image
                    out[-1]["map"] = grid(self.maps[module][e, ..., c])
        return out

    def parse_prompt(self, text: str) -> tuple[Any, list[str], dict]:
        """The model input for a prompt, the names of its positions, and what the page draws of it."""
        text = text.strip()
        if not text:
            raise ValueError("empty prompt")
        m = re.fullmatch(r"#(\d+)", text)
        if self.kind == "text":
            ids = self.exp.tokenizer(text)["input_ids"][:MAX_PROMPT_TOKENS]
            return (torch.tensor([ids], device=self.device), [self.exp.tokenizer.decode([t]) for t in ids], {})
        if self.kind == "other":
            raise ValueError("this experiment's inputs are neither text, token ids, vectors nor images")
        if m:
            k = int(m.group(1))
            if k >= self.X.shape[0]:
                raise ValueError(f"#{k}: there are {self.X.shape[0]} harvested inputs (#0 to #{self.X.shape[0] - 1})")
            x = self.X[k: k + 1]
        elif self.kind == "tokens":
            x = torch.tensor([[int(t) for t in re.split(r"[\s,]+", text)]])
        elif self.kind == "vector":
            x = torch.zeros(1, self.X.shape[1])
            for item in re.split(r"[\s,]+", text):
                i, _, v = item.partition(":")
                if not i.isdigit() or int(i) >= x.shape[1]:
                    raise ValueError(f"'{item}': expected INDEX or INDEX:VALUE with INDEX < {x.shape[1]}")
                x[0, int(i)] = float(v) if v else 1.0
        else:
            raise ValueError("type #k for the k-th harvested input")
        names = [f"{t} " for t in x[0].tolist()] if self.kind == "tokens" else ["input"]
        shown = {} if self.kind == "tokens" else show_input(x[0], self.dense)
        return x.to(self.device), names, shown

    @torch.no_grad()
    def prompt(self, text: str) -> dict:
        x, names, shown = self.parse_prompt(text)
        with self.lock:
            ci = self.model.ci_of(x)
        firing: list[list[dict]] = [[] for _ in names]
        for n, g in ci.items():  # (1, positions..., C) -> (tokens, positions within a token, C)
            g = g[0].float().clamp(0, 1).cpu().reshape(len(names), -1, ci[n].shape[-1])
            for t, pos, c in (g > self.threshold).nonzero().tolist():
                firing[t].append({"module": n, "c": c, "ci": round(float(g[t, pos, c]), 3),
                                  "pos": pos if g.shape[1] > 1 else None, "label": self.label(n, c).get("label")})
        for f in firing:
            f.sort(key=lambda e: -e["ci"])
        return {"tokens": names, "firing": firing, **shown}


PAGE = Path(__file__).with_name("explore.html")  # the whole front end: one page, its CSS and JS inline


def make_handler(ex: Explorer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def reply(self, fn) -> None:
            try:
                self.send(200, json.dumps(fn()).encode(), "application/json")
            except (KeyError, ValueError) as e:  # a bad request: the page shows the message
                self.send(400, json.dumps({"error": str(e).strip("'\"")}).encode(), "application/json")
            except Exception as e:  # the model refused the input (e.g. a token id out of range)
                self.send(500, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), "application/json")

        def do_GET(self) -> None:
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/":
                self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif url.path == "/api/summary":
                self.reply(ex.summary)
            elif url.path == "/api/components":
                self.reply(ex.components)
            elif url.path == "/api/component":
                self.reply(lambda: ex.component(q.get("module", ""), int(q.get("c", -1))))
            else:
                self.send(404, b"not found", "text/plain")

        def do_POST(self) -> None:
            if urlparse(self.path).path != "/api/prompt":
                return self.send(404, b"not found", "text/plain")
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.reply(lambda: ex.prompt(json.loads(body or b"{}").get("text", "")))

        def log_message(self, *args: Any) -> None:  # quiet: the terminal shows the URL, not every request
            pass

    return Handler


def serve(run_dir: Path, out: Path, port: int = 8000) -> tuple[ThreadingHTTPServer, str]:
    """The explorer's server bound to 127.0.0.1:port (0: any free port), not yet serving, and its URL."""
    if not (run_dir / "config.yaml").is_file():
        raise SPDError(f"{run_dir} is not a run dir (no config.yaml); pass the directory a decomposition wrote")
    ex = Explorer(run_dir, out)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(ex))
    except OSError as e:
        raise SPDError(f"cannot listen on 127.0.0.1:{port} ({e.strerror}); pass another --port") from e
    server.daemon_threads = True
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a decomposition's run dir (holds config.yaml and checkpoints/)")
    ap.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000; 0: any free port)")
    ap.add_argument("--out", type=Path, default=None, help="where harvest.json / autointerp.json live (default RUN_DIR/analysis)")
    args = ap.parse_args()
    server, url = serve(args.run_dir, args.out or args.run_dir / "analysis", args.port)
    print(f"exploring {args.run_dir} at {url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    run_main(main)
