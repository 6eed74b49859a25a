"""analysis/autointerp.py against a fake OpenAI-compatible server on 127.0.0.1 (no network): the request
format, labels and scores for every component of a tiny Llama run, the cache, the retry on a 429, the
scoring arithmetic and the one-line errors; the labels in the explorer and the report."""

import json
import re
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from analysis import autointerp
from analysis.autointerp import Client, balanced_accuracy, load_labels, parse_numbers
from spd_config import SPDError


class FakeLLM:
    """A chat-completions endpoint answering deterministically: a label names the marked token of the prompt's
    first context; a detection answer names excerpts 1-3. `status` queues error answers (e.g. [429]) sent first."""

    def __init__(self):
        self.requests, self.status, self.lock = [], [], threading.Lock()
        self.in_flight = self.max_in_flight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    status = fake.status.pop(0) if fake.status else 200
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                time.sleep(0.01)  # long enough for concurrent requests to overlap
                with fake.lock:
                    fake.in_flight -= 1
                if status != 200:
                    self.send_response(status)
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": "busy"}')
                    return
                user = body["messages"][-1]["content"]
                first = re.search(r"^1\. .*?<<(.*?)>>(?!>)", user, re.M)  # the first context's marked token
                text = f"fires on {first.group(1)!r}" if first and "has the label" not in user else "[1, 2, 3]"
                reply = {"choices": [{"message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": 5, "cost": 1e-4}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeLLM()
    yield server
    server.close()


def test_balanced_accuracy_and_reply_parsing():
    firing = [True, True, False, False]
    assert balanced_accuracy({0, 1}, firing) == 1.0
    assert balanced_accuracy({0, 2}, firing) == 0.5  # TPR 1/2, TNR 1/2
    assert balanced_accuracy({0, 1, 2}, firing) == 0.75  # TPR 1, TNR 1/2
    assert balanced_accuracy(set(), [True, False, False, False]) == 0.5  # TPR 0, TNR 1
    assert balanced_accuracy({1, 2, 3}, [True, False, False, False]) == 0.0
    assert parse_numbers("Sure: [2, 5, 9]", 5) == {1, 4}  # 1-based, out of range dropped
    assert parse_numbers("[]", 5) == set() and parse_numbers("none of them", 5) == set()
    assert parse_numbers("3 and 4", 5) == {2, 3}


def test_every_component_labelled_and_scored_then_cached(tiny_lm_run, fake, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tiny_lm_run / "analysis/harvest.json", out)
    h = json.loads((out / "harvest.json").read_text())
    comps = [(n, c) for n, m in h["modules"].items() for c in m["alive"]]

    client = Client(fake.url, "fake-model", "test-key")
    path = autointerp.autointerp(tiny_lm_run, out, client, concurrency=4, n_score=3)
    assert len(fake.requests) == client.usage["requests"] == 2 * len(comps)  # a label and a score each
    assert fake.max_in_flight > 1  # concurrent
    for r in fake.requests:  # the OpenAI chat-completions format
        assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer test-key"
        assert r["body"]["model"] == "fake-model" and [m["role"] for m in r["body"]["messages"]] == ["system", "user"]
    assert client.usage["prompt_tokens"] == sum(len(r["body"]["messages"][-1]["content"]) // 4 for r in fake.requests)
    assert client.usage["cost"] == pytest.approx(1e-4 * len(fake.requests)) and client.usage["cost_reported"]

    result = json.loads(path.read_text())
    assert path == out / "autointerp.json" and result["checkpoint"] == h["checkpoint"]
    assert load_labels(out) == result["components"]
    scores = []
    for n, c in comps:
        top = h["modules"][n]["lm"][str(c)]["contexts"][0]
        entry = json.loads((out / f"autointerp/{n}__{c}.json").read_text())
        assert entry["label"] == result["components"][n][str(c)]["label"] == f"fires on {top['tokens'][top['pos']].replace(chr(10), '⏎')!r}"
        firing = entry["firing"]
        assert len(firing) <= 6 and entry["n_firing"] == sum(firing) <= 3 and entry["n_silent"] <= 3
        if 0 < sum(firing) < len(firing):  # the fake names excerpts 1-3: balanced accuracy by hand
            assert entry["predicted"] == [0, 1, 2]
            tpr = sum(firing[:3]) / sum(firing)
            tnr = sum(not f for f in firing[3:]) / (len(firing) - sum(firing))
            assert entry["balanced_accuracy"] == pytest.approx((tpr + tnr) / 2, abs=1e-4)
            scores.append(entry["balanced_accuracy"])
        else:
            assert entry["balanced_accuracy"] is None
    assert scores and result["mean_balanced_accuracy"] == pytest.approx(sum(scores) / len(scores))

    labels = {e["label"] for m in result["components"].values() for e in m.values()}
    for r in fake.requests:  # a score's prompt: the label, then each held-out context with one token marked
        user = r["body"]["messages"][-1]["content"]
        if "has the label" in user:
            excerpts = [line for line in user.splitlines() if re.match(r"\d+\. ", line)]
            assert 2 <= len(excerpts) <= 6 and all(line.count("<<") == 1 for line in excerpts)
            assert re.search(r'has the label: "(.*)"\.\n', user).group(1) in labels

    fake.requests.clear()
    again = Client(fake.url, "fake-model", "test-key")
    assert autointerp.autointerp(tiny_lm_run, out, again, concurrency=4, n_score=3) == path
    assert fake.requests == [] and again.usage["requests"] == 0  # all from the cache
    assert json.loads(path.read_text()) == result

    n, c = comps[0]  # a run killed after this label, before its score, continues with the score alone
    cached = out / f"autointerp/{n}__{c}.json"
    entry = json.loads(cached.read_text())
    for k in ("balanced_accuracy", "predicted", "firing"):
        entry.pop(k, None)
    cached.write_text(json.dumps(entry))
    autointerp.autointerp(tiny_lm_run, out, Client(fake.url, "fake-model", "test-key"), n_score=3)
    assert len(fake.requests) == 1 and "has the label" in fake.requests[0]["body"]["messages"][-1]["content"]

    fake.requests.clear()  # another model's labels are not this one's
    autointerp.autointerp(tiny_lm_run, out, Client(fake.url, "other-model", "k"), limit=2, n_score=3)
    assert len(fake.requests) == 4

    # the labels in the report's component tables
    from analysis.report import components_html
    html = components_html(h, load_labels(out))
    label = load_labels(out)[n][str(c)]["label"]
    assert "<th>label</th>" in html and label.replace("'", "&#x27;") in html


def test_retry_on_429_then_errors(fake):
    fake.status = [429, 429]
    client = Client(fake.url, "m", "k", retries=3, backoff=0)
    assert client.chat("s", "u", 5) == "[1, 2, 3]"
    assert len(fake.requests) == 3 and client.usage["requests"] == 1 and client.usage["retries"] == 2
    fake.status = [503, 503]
    with pytest.raises(SPDError, match=r"HTTP 503 after 2 tries"):
        Client(fake.url, "m", "k", retries=1, backoff=0).chat("s", "u", 5)
    fake.status = [401]
    with pytest.raises(SPDError, match=r"refused the request: HTTP 401 .*check the key"):
        Client(fake.url, "m", "k").chat("s", "u", 5)
    port = fake.server.server_address[1]
    fake.close()  # nothing listens there now
    with pytest.raises(SPDError, match=rf"cannot reach http://127.0.0.1:{port}/v1/chat/completions .*--base-url"):
        Client(fake.url, "m", "k").chat("s", "u", 5)


def test_missing_key_is_one_error(monkeypatch, tmp_path):
    monkeypatch.delenv("MY_KEY", raising=False)
    monkeypatch.setattr(sys, "argv", ["autointerp.py", str(tmp_path), "--api-key-env", "MY_KEY"])
    with pytest.raises(SPDError, match="no API key: set MY_KEY"):
        autointerp.main()
