"""Language models: decomposing randomly initialised tiny GPT-2 / Llama models (no download), the
data pipeline, CE unrecovered, offline errors, and the script end to end on a tiny built target."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lm_decomposition
from lm_decomposition import DataConfig, LMConfig, ce_unrecovered, load_model, load_tokens, offline_hint
from spd_common import ComponentModel, SPDConfig
from spd_config import SPDError, load_config
from train_targets.train_lm import TokenBatches, next_token_ce, pack

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)).eval()  # eval: no dropout


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)).eval()


GPT2_PATTERNS = ["transformer.h.*.attn.c_attn", "transformer.h.*.attn.c_proj", "transformer.h.*.mlp.c_*",
                 "transformer.wte"]
LLAMA_PATTERNS = ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj", "model.embed_tokens", "lm_head"]


def set_exact_factorisation(model: ComponentModel) -> None:
    """U V = W exactly, via the SVD (C >= rank), so masks of 1 need no delta component."""
    with torch.no_grad():
        for mod in model.decomposed.values():
            u, s, vh = torch.linalg.svd(mod.target_weight(), full_matrices=False)
            r = s.numel()
            assert mod.components.C >= r
            mod.components.U.zero_()[:, :r] = u * s
            mod.components.V.zero_()[:r] = vh


@pytest.mark.parametrize("build,patterns,n_modules,conv1d", [(tiny_gpt2, GPT2_PATTERNS, 9, 8),
                                                            (tiny_llama, LLAMA_PATTERNS, 16, 0)])
def test_decomposition_attaches_and_reproduces_logits(build, patterns, n_modules, conv1d):
    target = build()
    tokens = torch.randint(0, VOCAB, (3, 10))
    with torch.no_grad():
        before = target(tokens).logits
    model = ComponentModel(target, {p: 32 for p in patterns}, {}, "mlp", [4])  # C >= every weight's rank
    assert len(model.names) == n_modules
    assert sum(isinstance(m.original, Conv1D) for m in model.decomposed.values()) == conv1d
    if conv1d:  # GPT-2's c_attn is a Conv1D with weight (d_in=16, d_out=48): seen as (48, 16)
        mod = model.decomposed["transformer.h.0.attn.c_attn"]
        assert mod.target_weight().shape == (48, 16) and mod.components.U.shape == (48, 32)
    out, _ = model.run_target(tokens)
    torch.testing.assert_close(out.logits, before)  # no masks: the original modules run
    ones = {n: torch.ones(3, 10, model.C[n]) for n in model.names}
    deltas = {n: torch.ones(3, 10) for n in model.names}
    with torch.no_grad(), model.masked(ones, deltas):
        torch.testing.assert_close(model(tokens).logits, before, atol=1e-4, rtol=1e-4)
    set_exact_factorisation(model)
    with torch.no_grad(), model.masked(ones):
        torch.testing.assert_close(model(tokens).logits, before, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), model.masked({n: torch.zeros_like(m) for n, m in ones.items()}):
        assert not torch.allclose(model(tokens).logits, before, atol=1e-2)  # ablating changes the output


def test_conv1d_masked_forward_matches_hand_computation():
    conv = Conv1D(nf=5, nx=3)  # x @ weight (3, 5) + bias
    torch.nn.init.normal_(conv.bias)
    net = torch.nn.Sequential(conv)
    model = ComponentModel(net, {"0": 4}, {}, "mlp", [4])
    mod = model.decomposed["0"]
    U, V = mod.components.U, mod.components.V
    x, mask = torch.randn(2, 3), torch.rand(2, 4)
    expected = torch.stack([(U @ torch.diag(mask[b]) @ V) @ x[b] for b in range(2)]) + conv.bias
    with torch.no_grad(), model.masked({"0": mask}):
        torch.testing.assert_close(model(x), expected)
    with torch.no_grad(), model.masked({"0": mask}, {"0": torch.ones(2)}):
        delta = conv.weight.T - U @ V  # W - UV, with W = conv.weight.T as a (d_out, d_in) matrix
        torch.testing.assert_close(model(x), expected + x @ delta.T)


def test_ce_and_ce_unrecovered_hand_computed():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]]])  # last position is not scored
    tokens = torch.tensor([[0, 1, 0]])
    # position 0 predicts token 1 with p = 3/4, position 1 predicts token 0 with p = 1/2
    assert next_token_ce(logits, tokens).item() == pytest.approx(-(math.log(0.75) + math.log(0.5)) / 2)
    assert ce_unrecovered(1.2, 1.0, 3.0) == pytest.approx(0.1)
    assert ce_unrecovered(1.0, 1.0, 3.0) == 0.0 and ce_unrecovered(3.0, 1.0, 3.0) == 1.0


def test_pack_and_step_indexed_batches_sharded_by_rank():
    data = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_id=0, seq_len=4)
    assert data.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack([[1, 2, 3], [4, 5]], eos_id=None, seq_len=2, max_tokens=3).tolist() == [[1, 2]]
    with pytest.raises(SPDError, match="fewer than one sequence"):
        pack([[1]], eos_id=0, seq_len=4)
    rows = torch.arange(10)[:, None].expand(10, 3)
    whole = TokenBatches(rows, 4, seed=1)
    assert torch.equal(whole(7), TokenBatches(rows, 4, seed=1)(7))  # a function of the step alone
    seen = torch.cat([whole(s) for s in range(5)])[:, 0]  # steps 0-4 cover 2 epochs of 10 rows
    assert sorted(seen.tolist()) == sorted(list(range(10)) * 2)
    ranks = [TokenBatches(rows, 4, seed=1, rank=r, world_size=2)(3) for r in range(2)]
    assert torch.equal(torch.cat(ranks), whole(3))  # ranks split the global batch, no overlap
    with pytest.raises(SPDError, match="not divisible"):
        TokenBatches(rows, 5, seed=1, world_size=2)


def test_local_json_dataset_and_missing_file(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "a": 1, "b": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"story": s}) + "\n" for s in ["a b", "b b a", "a"]))
    cfg = DataConfig(name="json", data_files={"train": str(tmp_path / "train.jsonl")}, column="story", seq_len=3)
    assert load_tokens(cfg, "train", tokenizer).tolist() == [[1, 2, 0], [2, 2, 1], [0, 1, 0]]
    (tmp_path / "train.txt").write_text("a b\nb b a\n\na\n")
    # the 'text' builder keeps a paragraph (blank-line separated) as one document by default ...
    text = DataConfig(name="text", data_files={"train": str(tmp_path / "train.txt")}, seq_len=3)
    assert load_tokens(text, "train", tokenizer).tolist() == [[1, 2, 2], [2, 1, 0]]  # a b b b a <eos> | a <eos>
    # ... and cuts at every line only when asked (an end-of-text token after each)
    lines = DataConfig(name="text", data_files={"train": str(tmp_path / "train.txt")}, seq_len=3, sample_by="line")
    assert load_tokens(lines, "train", tokenizer).tolist() == [[1, 2, 0], [2, 2, 1], [0, 0, 1]]
    with pytest.raises(SPDError, match="no column 'text'"):
        load_tokens(DataConfig(name="json", data_files=cfg.data_files, seq_len=3), "train", tokenizer)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SPDError, match=r"data file .*empty.jsonl is empty"):
        load_tokens(DataConfig(name="json", data_files={"train": str(tmp_path / "empty.jsonl")}), "train", tokenizer)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{bad json\n')
    with pytest.raises(SPDError, match=r"bad.jsonl.*could not be read .*JSON parse error.*fix the file") as bad:
        load_tokens(DataConfig(name="json", data_files={"train": str(tmp_path / "bad.jsonl")}), "train", tokenizer)
    assert "\n" not in str(bad.value)
    missing = DataConfig(name="json", data_files={"train": str(tmp_path / "nope.jsonl")})
    with pytest.raises(SPDError, match=r"could not be loaded .*configs/tiny_llama.yaml"):
        load_tokens(missing, "train", tokenizer)


@pytest.mark.parametrize("name", ["tiny_llama", "lm_recipe", "smollm2", "smollm2_3layer", "ss_llama", "gpt2", "smollm2_135m"])
def test_lm_configs_load(name):
    cfg = load_config(LMConfig, ROOT / "configs" / f"{name}.yaml")
    assert cfg.spd.output_loss == ("mse" if cfg.train_on == "residual" else "kl") and cfg.spd.modules


def test_missing_model_offline_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "lm_decomposition.py"), str(ROOT / "configs/ss_llama.yaml"),
                           "model=nobody/no-such-model-xyz", "--out", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model 'nobody/no-such-model-xyz' could not be loaded")
    assert "HF_HUB_OFFLINE" not in last and "configs/tiny_llama.yaml" in last  # it is set already


def test_offline_hint_names_hf_hub_offline_only_when_unset(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert "set HF_HUB_OFFLINE=1" in offline_hint()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" not in offline_hint() and "configs/tiny_llama.yaml" in offline_hint()


@pytest.mark.parametrize("name", ["./no-such-model", "../no/such/model", "/no/such/model", "~/no-such-model-xyz"])
def test_missing_model_path_is_no_such_directory(name):
    with pytest.raises(SPDError, match=rf"^model '{name}': no such directory"):  # the hub is never asked
        load_model(name)


def test_module_patterns_are_checked_before_the_data_is_read(monkeypatch):
    monkeypatch.setattr(lm_decomposition, "load_model", lambda name: (tiny_llama(), None))
    monkeypatch.setattr(lm_decomposition, "load_tokens", lambda *a: pytest.fail("tokenised before the patterns"))
    cfg = LMConfig(model="m", data=DataConfig(name="json"), spd=SPDConfig(modules={"model.layers.*.mlpp.*": 4},
                                                                           device="cpu"))
    with pytest.raises(SPDError, match=r"'model.layers.\*.mlpp.\*' matches no"):
        lm_decomposition.build(cfg)


@pytest.mark.parametrize("config", ["tiny_llama", "lm_recipe"])
def test_script_builds_tiny_target_and_decomposes(tmp_path, config):
    """Our offline default and the reference's LM recipe, end to end on a smaller tiny Llama built on the way."""
    t = tmp_path / "tl"
    overrides = [f"model={t}", f"target.path={t}", "target.n_train_stories=300", "target.n_test_stories=40",
                 "target.d_model=16", "target.d_mlp=32", "target.n_heads=2", "target.seq_len=32", "target.steps=3",
                 "target.batch_size=4", "target.vocab_size=300",
                 f"data.data_files={{train: {t}/corpus/train.jsonl, test: {t}/corpus/test.jsonl}}", "data.seq_len=32",
                 "spd.steps=4", "spd.eval_every=2", "spd.log_every=1", "spd.batch_size=4", "spd.eval_batch_size=4",
                 "spd.grad_accum_steps=2", "spd.faithfulness_warmup_steps=2", "spd.modules={model.layers.*.mlp.*: 8}",
                 "n_eval_batches=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "lm_decomposition.py"), str(ROOT / f"configs/{config}.yaml"),
                           *overrides, "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "building the offline tiny Llama" in proc.stdout
    results = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    for key in ["ce/target", "ce/ci_masked", "ce/stochastic", "ce/ablated", "kl/ci_masked", "kl/stochastic",
                "kl/ablated", "ce_unrecovered", "tokens_per_s", "peak_rss_mb", "l0/model.layers.0.mlp.up_proj",
                "recon/pgd_shared_20"]:  # the reference's evaluation adversary: 20 steps of 0.1, shared
        assert key in results, key
    assert results["C"] == {f"model.layers.{i}.mlp.{p}_proj": 8 for i in range(2) for p in ("gate", "up", "down")}
    for fig in ["l0_over_training", "ci_histograms", "firing_density"]:
        assert (tmp_path / f"run/figures/{fig}.png").is_file()
    evals = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert [r["step"] for r in evals if "eval/ce/target" in r] == [2, 4]


def test_checkpointed_blocks_give_the_same_losses_and_gradients():
    """Recomputed in backward under the masks they ran with, checkpointed blocks change nothing but memory."""
    from spd_common import training_losses

    tokens = torch.randint(0, VOCAB, (4, 10))
    cfg = SPDConfig(stochastic_recon_layerwise_coeff=1.0, layerwise_routed=True, ci_masked_recon_coeff=1.0,
                    output_loss="kl")
    grads = []
    for blocks in (None, "model.layers.*"):
        model = ComponentModel(tiny_llama(), {p: 8 for p in LLAMA_PATTERNS}, {}, "mlp", [4])
        if blocks:
            assert model.checkpoint_blocks(blocks) == ["model.layers.0", "model.layers.1"]
        torch.manual_seed(1)
        losses = training_losses(model, cfg, tokens, 0.5, lambda out: out.logits)
        losses["total"].backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for g, h in zip(*grads):
        torch.testing.assert_close(h, g)
    with pytest.raises(SPDError, match="matches no module of the target"):
        model.checkpoint_blocks("transformer.h.*")


@pytest.mark.parametrize("build, patterns, layer", [(tiny_llama, ["model.layers.0.mlp.*_proj"], "model.layers.0"),
                                                    (tiny_gpt2, ["transformer.h.0.mlp.c_*"], "transformer.h.0")])
def test_residual_stop_returns_the_layer_output_and_runs_nothing_after(build, patterns, layer):
    """train_on: residual: the forward ends at the last decomposed layer (its output = the hidden state the
    whole model reports there), the layers after it and the unembedding never run; `full()` runs all."""
    from lm_decomposition import ResidualStop

    target = build()
    x = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        whole = target(x, output_hidden_states=True)
    model = ComponentModel(target, {p: 4 for p in patterns}, {}, "mlp", [4])
    assert ResidualStop.last_layer(model.names) == layer
    stop = ResidualStop(target, layer)
    ran = []
    head = target.get_output_embeddings()
    head.register_forward_hook(lambda *_: ran.append("head"))
    with torch.no_grad():
        hidden = model(x)
        assert ran == [] and torch.allclose(hidden, whole.hidden_states[int(layer[-1]) + 1], atol=1e-6)
        with stop.full():
            assert torch.equal(model(x).logits, whole.logits) and ran == ["head"]
    with pytest.raises(SPDError, match="train_on: residual .* lm_head is in none"):
        ResidualStop.last_layer(["model.layers.0.mlp.up_proj", "lm_head"])


@pytest.mark.parametrize("ci_fn, hidden", [("mlp", [16]), ("shared_mlp", [64]), ("global_transformer", [32])])
def test_checkpointed_ci_functions_give_the_same_losses_and_gradients_and_keep_less(ci_fn, hidden):
    """spd.checkpoint_ci: the CI functions' activations are recomputed in backward, not kept; nothing else changes."""
    from spd_common import training_losses

    tokens = torch.randint(0, VOCAB, (4, 10))
    cfg = SPDConfig(ci_masked_recon_coeff=1.0, output_loss="kl")
    grads, losses, kept = [], [], []
    for checkpoint_ci in (False, True):
        model = ComponentModel(tiny_llama(), {p: 8 for p in LLAMA_PATTERNS[:2]}, {}, ci_fn, hidden)
        model.checkpoint_ci = checkpoint_ci
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            torch.manual_seed(1)
            out = training_losses(model, cfg, tokens, 0.5, lambda out: out.logits)
        out["total"].backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
        losses.append(out["total"].detach())
        kept.append(sum(saved))
    torch.testing.assert_close(losses[1], losses[0])
    for g, h in zip(*grads):
        torch.testing.assert_close(h, g)
    assert kept[1] < kept[0]
