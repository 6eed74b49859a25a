"""Label each alive subcomponent of a language-model decomposition with an LLM, and score each label.

    python analysis/autointerp.py RUN_DIR [--base-url URL] [--model NAME] [--api-key-env VAR]
        [--concurrency N] [--limit N] [--n-score K] [--price-in USD --price-out USD] [--out DIR]

Any OpenAI-compatible chat endpoint works (POST BASE_URL/chat/completions, `Authorization: Bearer KEY`):
OpenRouter (the default), OpenAI (--base-url https://api.openai.com/v1), a vLLM server or Ollama
(http://localhost:11434/v1; any non-empty key). The key is read from the environment variable --api-key-env.

  1. Label: the prompt gives a component's top activating contexts from harvest.json (the token it fires
     on marked <<like this>>, with its CI) and the next tokens it promotes and suppresses; the answer,
     a few words, is the label.
  2. Detection score: the LLM is shown the label and 2K shuffled held-out contexts, each with one token
     marked: up to K where the component fires on the marked token (CI > spd.ci_threshold) and K where
     it does not, and names those where it fires. Score = balanced accuracy = (fraction of firing
     contexts named + fraction of the others not named) / 2: 0.5 is chance, 1 perfect. The contexts come
     from held-out batches after the ones harvested (exp.eval_batch(n_batches ...)), so none was in the
     labelling prompt.

Each component's result is cached in OUT/autointerp/<module>__<c>.json as soon as it is known (label first,
then score), valid for the same model and checkpoint: a rerun costs nothing, an interrupted run continues.
Requests run concurrently (--concurrency); 429 and 5xx answers and timeouts are retried with exponential
backoff (honouring Retry-After). A missing key, an unreachable endpoint or a refused request is one `error:`
line. Prints the requests, tokens and cost (the endpoint's `usage.cost` when it reports one, e.g. OpenRouter;
else from --price-in/--price-out), writes OUT/autointerp.json and prints its path as the last line:

  {"model": str, "base_url": str, "checkpoint": str, "mean_balanced_accuracy": float | null,
   "components": {module: {str(c): {"label": str, "balanced_accuracy": float | null (null: the held-out
                                    batches gave only one class), "n_firing": int, "n_silent": int}}}}
A cache file holds the same for one component, plus "firing" (per shown context) and "predicted" (the
0-based indices the LLM named).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from analysis.harvest import context_window, harvested  # noqa: E402
from spd_config import SPDError  # noqa: E402
from spd_run import load_run, run_main  # noqa: E402

LABEL_CONTEXTS = 8  # top contexts in the labelling prompt (harvest keeps --top-k)
SCORE_BATCHES = 2  # held-out batches the detection contexts are drawn from

LABEL_SYSTEM = ("You interpret the components of a language model that has been decomposed into many small "
                "parts, each active on few tokens. Answer with a label of at most eight words and nothing else.")
SCORE_SYSTEM = ("You predict where a component of a language model is active, from its label. Answer with a "
                "JSON list of example numbers and nothing else.")


def load_labels(out: Path) -> dict[str, dict[str, dict]]:
    """{module: {str(c): {"label", "balanced_accuracy", ...}}} from out/autointerp.json, {} when there is none."""
    path = out / "autointerp.json"
    return json.loads(path.read_text())["components"] if path.is_file() else {}


def marked(tokens: list[str], pos: int) -> str:
    """A context as one line, the token at `pos` marked <<like this>> (None: no mark)."""
    return "".join(f"<<{t}>>" if i == pos else t for i, t in enumerate(tokens)).replace("\n", "⏎")


def label_prompt(module: str, density: float, details: dict) -> str:
    contexts = "\n".join(f"{i + 1}. {marked(x['tokens'], x['pos'])}   (CI {x['ci']:.2f})"
                         for i, x in enumerate(details["contexts"][:LABEL_CONTEXTS]))
    tokens = lambda effects: ", ".join(repr(e["token"]) for e in effects)  # noqa: E731
    return (f"A component of the layer {module} is active on {100 * density:.2g}% of tokens. Its top activating "
            f"contexts, the token it is most active on marked <<like this>>, with its causal importance (CI, 0-1):\n"
            f"{contexts}\n\nWhere it is active, it raises the probability that the next token is one of: "
            f"{tokens(details['promotes'])}\nand lowers it for: {tokens(details['suppresses'])}\n\n"
            f"What does this component respond to or do? Reply with a short label (at most 8 words) and nothing else.")


def score_prompt(label: str, contexts: list[tuple[list[str], int]]) -> str:
    listed = "\n".join(f"{i + 1}. {marked(t, pos)}" for i, (t, pos) in enumerate(contexts))
    return (f"A component of a language model has the label: \"{label}\".\nEach of the {len(contexts)} text "
            f"excerpts below has one token marked <<like this>>; on some of them the component is active.\n"
            f"{listed}\n\nIn which excerpts is it active on the marked token? Reply with a JSON list of their "
            f"numbers, e.g. [1, 4], and nothing else ([] if none).")


def parse_numbers(reply: str, n: int) -> set[int]:
    """The 0-based indices named in a reply such as "[2, 5]" (1-based); out-of-range numbers are dropped."""
    found = re.search(r"\[([^\]]*)\]", reply)
    return {int(k) - 1 for k in re.findall(r"\d+", found.group(1) if found else reply) if 1 <= int(k) <= n}


def balanced_accuracy(predicted: set[int], firing: list[bool]) -> float:
    """(true positive rate + true negative rate) / 2 of `predicted` (indices) against `firing` (per example)."""
    pos = [i for i, f in enumerate(firing) if f]
    neg = [i for i, f in enumerate(firing) if not f]
    return (sum(i in predicted for i in pos) / len(pos) + sum(i not in predicted for i in neg) / len(neg)) / 2


class Client:
    """An OpenAI-compatible chat endpoint: retries, backoff, and the usage it reports, summed over threads."""

    def __init__(self, base_url: str, model: str, key: str, retries: int = 5, backoff: float = 1.0,
                 timeout: float = 120.0):
        self.url, self.model, self.key = base_url.rstrip("/") + "/chat/completions", model, key
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.lock = threading.Lock()
        self.usage = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0,
                      "cost_reported": False}

    def chat(self, system: str, user: str, max_tokens: int) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": max_tokens,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body.encode(), method="POST", headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    reply = json.load(r)
                break
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:
                    detail = e.read(300).decode(errors="replace").replace("\n", " ")
                    hint = "check the key in --api-key-env" if e.code in (401, 403) else "check --model and --base-url"
                    raise SPDError(f"{self.url} refused the request: HTTP {e.code} {detail}; {hint}") from e
                after = e.headers.get("Retry-After", "")  # seconds; the HTTP-date form falls back to backoff
                wait_s = float(after) if after.replace(".", "", 1).isdigit() else self.backoff * 2 ** attempt
                problem = f"HTTP {e.code}"
            except urllib.error.URLError as e:
                if not isinstance(e.reason, TimeoutError):  # refused, no such host: retrying will not help
                    raise SPDError(f"cannot reach {self.url} ({e.reason}); check --base-url and that the "
                                   f"server is up") from e
                wait_s, problem = self.backoff * 2 ** attempt, "timed out"
            except json.JSONDecodeError as e:
                raise SPDError(f"{self.url} answered with something other than JSON ({e}); check --base-url "
                               f"(it ends before /chat/completions, e.g. .../v1)") from e
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:  # a dropped connection
                wait_s, problem = self.backoff * 2 ** attempt, type(e).__name__
            if attempt == self.retries:
                raise SPDError(f"{self.url}: {problem} after {self.retries + 1} tries; try again later or lower "
                               f"--concurrency")
            with self.lock:
                self.usage["retries"] += 1
            time.sleep(wait_s)
        usage = reply.get("usage") or {}
        with self.lock:
            self.usage["requests"] += 1
            self.usage["prompt_tokens"] += usage.get("prompt_tokens", 0)
            self.usage["completion_tokens"] += usage.get("completion_tokens", 0)
            if "cost" in usage:
                self.usage["cost"] += float(usage["cost"])
                self.usage["cost_reported"] = True
        try:
            return reply["choices"][0]["message"]["content"].strip()
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise SPDError(f"{self.url} answered without choices[0].message.content: {str(reply)[:200]}") from e


def detection_contexts(run_dir: Path, h: dict, todo: list[tuple[str, int]], k: int,
                       seed: int = 0) -> dict[tuple[str, int], tuple[list[tuple[list[str], int]], list[bool]]]:
    """Per component: up to 2k shuffled held-out contexts (tokens, index of the marked token), up to k where
    it fires on the marked token and k where it does not, and which fire. Read on eval batches n_batches to
    n_batches + SCORE_BATCHES - 1."""
    _, exp = load_run(run_dir)
    xs = [exp.input_fn(exp.eval_batch(h["n_batches"] + i)) for i in range(SCORE_BATCHES)]
    with torch.no_grad():
        cis = [exp.model.ci_of(x) for x in xs]
    tokens = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).cpu()  # (sequences, seq)
    seq = tokens.shape[1]
    out = {}
    for module, c in todo:
        fires = torch.cat([ci[module][..., c].reshape(-1, seq) for ci in cis]).cpu() > h["ci_threshold"]
        rng = random.Random(f"{seed}:{module}:{c}")
        firing = rng.sample(fires.nonzero().tolist(), min(k, int(fires.sum())))
        silent = rng.sample((~fires).nonzero().tolist(), min(k, int((~fires).sum())))
        examples = [(s, p, True) for s, p in firing] + [(s, p, False) for s, p in silent]
        rng.shuffle(examples)
        out[(module, c)] = ([context_window(tokens[s], p, exp.tokenizer) for s, p, _ in examples],
                            [f for _, _, f in examples])
    return out


def cache_path(out: Path, module: str, c: int) -> Path:
    return out / "autointerp" / f"{module}__{c}.json"


def save(path: Path, entry: dict) -> None:
    tmp = path.with_suffix(".tmp")  # written whole, then renamed: a kill never leaves a torn file
    tmp.write_text(json.dumps(entry))
    tmp.replace(path)


def autointerp(run_dir: Path, out: Path, client: Client, concurrency: int = 8, limit: int | None = None,
               n_score: int = 5) -> Path:
    h = harvested(run_dir, out)
    if not h["lm"]:
        raise SPDError(f"{run_dir} is not a language-model run (harvest.json has no contexts); autointerp labels "
                       f"LM components")
    comps = sorted(((n, c) for n, m in h["modules"].items() for c in m["alive"]),
                   key=lambda nc: -h["modules"][nc[0]]["density"][nc[1]])[:limit]
    (out / "autointerp").mkdir(parents=True, exist_ok=True)
    entries = {}
    for n, c in comps:  # the cache: valid for the same model and checkpoint
        path = cache_path(out, n, c)
        entry = json.loads(path.read_text()) if path.is_file() else {}
        if entry.get("model") != client.model or entry.get("checkpoint") != h["checkpoint"]:
            entry = {"module": n, "c": c, "model": client.model, "checkpoint": h["checkpoint"]}
        entries[(n, c)] = entry
    to_score = [nc for nc, e in entries.items() if "balanced_accuracy" not in e]
    contexts = detection_contexts(run_dir, h, to_score, n_score) if to_score else {}
    stop = threading.Event()

    def work(n: str, c: int) -> None:
        entry, path = entries[(n, c)], cache_path(out, n, c)
        if stop.is_set():
            return
        if "label" not in entry:
            m = h["modules"][n]
            entry["label"] = client.chat(LABEL_SYSTEM, label_prompt(n, m["density"][c], m["lm"][str(c)]), 40)
            save(path, entry)
        if "balanced_accuracy" not in entry and not stop.is_set():
            texts, firing = contexts[(n, c)]
            entry["firing"] = firing
            entry["n_firing"], entry["n_silent"] = sum(firing), len(firing) - sum(firing)
            if all(firing) or not any(firing):  # one class only: no balanced accuracy to measure
                entry["balanced_accuracy"] = None
            else:
                reply = client.chat(SCORE_SYSTEM, score_prompt(entry["label"], texts), 60)
                entry["predicted"] = sorted(parse_numbers(reply, len(texts)))
                entry["balanced_accuracy"] = round(balanced_accuracy(set(entry["predicted"]), firing), 4)
            save(path, entry)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(work, n, c) for n, c in comps]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            stop.set()
            for f in futures:
                f.cancel()
            raise failed[0].exception()

    scores = [e["balanced_accuracy"] for e in entries.values() if e.get("balanced_accuracy") is not None]
    result = {"model": client.model, "base_url": client.url.removesuffix("/chat/completions"),
              "checkpoint": h["checkpoint"], "mean_balanced_accuracy": sum(scores) / len(scores) if scores else None,
              "components": {}}
    for (n, c), e in entries.items():
        result["components"].setdefault(n, {})[str(c)] = {k: e.get(k) for k in ("label", "balanced_accuracy",
                                                                                 "n_firing", "n_silent")}
    path = out / "autointerp.json"
    save(path, result)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a language-model decomposition's run dir")
    ap.add_argument("--base-url", default="https://openrouter.ai/api/v1", help="OpenAI-compatible API root")
    ap.add_argument("--model", default="openai/gpt-4o-mini", help="model name as the endpoint spells it")
    ap.add_argument("--api-key-env", default="OPENROUTER_API_KEY", help="environment variable holding the key")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    ap.add_argument("--limit", type=int, default=None, help="label only the N densest components")
    ap.add_argument("--n-score", type=int, default=5, help="firing and silent held-out contexts per score (default 5)")
    ap.add_argument("--retries", type=int, default=5, help="retries of a 429 / 5xx / timeout (default 5)")
    ap.add_argument("--price-in", type=float, default=None, help="USD per million prompt tokens (for the cost)")
    ap.add_argument("--price-out", type=float, default=None, help="USD per million completion tokens")
    ap.add_argument("--out", type=Path, default=None, help="output dir (default RUN_DIR/analysis)")
    args = ap.parse_args()
    if args.concurrency < 1 or args.n_score < 1 or args.retries < 0:
        raise SPDError("--concurrency and --n-score must be at least 1, --retries at least 0")
    key = os.environ.get(args.api_key_env, "")
    if not key:
        raise SPDError(f"no API key: set {args.api_key_env} (or name another variable with --api-key-env; for a "
                       f"local server that needs none, any value, e.g. {args.api_key_env}=none)")
    client = Client(args.base_url, args.model, key, retries=args.retries)
    t0 = time.time()
    path = autointerp(args.run_dir, args.out or args.run_dir / "analysis", client, args.concurrency, args.limit,
                      args.n_score)
    u = client.usage
    result = json.loads(path.read_text())
    n = sum(len(v) for v in result["components"].values())
    mean = result["mean_balanced_accuracy"]
    if u["requests"] == 0:
        cost = "$0 (every component came from the cache)"
    elif u["cost_reported"]:
        cost = f"${u['cost']:.4f} (reported by the endpoint)"
    elif args.price_in is not None and args.price_out is not None:
        cost = f"${(u['prompt_tokens'] * args.price_in + u['completion_tokens'] * args.price_out) / 1e6:.4f}"
    else:
        cost = "unknown (pass --price-in and --price-out, USD per million tokens)"
    print(f"{n} components labelled; mean detection balanced accuracy "
          f"{'n/a' if mean is None else f'{mean:.3f}'}")
    print(f"{u['requests']} requests ({u['retries']} retried), {u['prompt_tokens']} prompt + "
          f"{u['completion_tokens']} completion tokens, cost {cost}, {time.time() - t0:.1f} s")
    print(path)


if __name__ == "__main__":
    run_main(main)
