"""The induction-head experiment: data by construction, a tiny target, ablations, the script."""

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ih_decomposition import ci_by_position, ih_metrics, masked_accuracy
from spd_common import ComponentModel
from train_targets.train_ih import IHTargetConfig, accuracy, induction_batch, train_ih

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=8, seq_len=8, d_model=32, steps=800, batch_size=128, lr=1e-2)


def test_induction_labels_are_correct_by_construction():
    tokens, labels, pos_a = induction_batch(vocab_size=10, seq_len=12, batch_size=2000, seed=0, step=0)
    rows = torch.arange(2000)
    a = tokens[:, -1]
    assert torch.equal(tokens[rows, pos_a], a)  # the first A
    assert torch.equal(tokens[rows, pos_a + 1], labels)  # B follows it
    assert torch.all(labels != a)
    assert torch.all((tokens == a[:, None]).sum(1) == 2)  # A occurs exactly twice
    assert pos_a.min() == 0 and pos_a.max() == 12 - 3  # every legal position is used
    assert torch.equal(tokens, induction_batch(10, 12, 2000, seed=0, step=0)[0])  # indexed: reproducible


@pytest.fixture(scope="module")
def tiny_target():
    return train_ih(IHTargetConfig(**TINY, min_accuracy=0.9, path="unused"))


def test_tiny_target_learns_induction(tiny_target):
    tokens, labels, _ = induction_batch(8, 8, 2048, seed=99, step=0)
    assert accuracy(tiny_target, tokens, labels) > 0.9


def exact_factorisation(model):
    with torch.no_grad():
        for name in model.untied_names():
            mod = model.decomposed[name]
            u, s, vh = torch.linalg.svd(mod.target_weight(), full_matrices=False)
            mod.components.U.zero_()[:, : s.numel()] = u * s
            mod.components.V.zero_()[: s.numel()] = vh


def test_layer_ablation_destroys_accuracy_while_full_masks_keep_it(tiny_target):
    model = ComponentModel(copy.deepcopy(tiny_target), {"blocks.*.attn.*_proj": 32}, {}, "vector_mlp", [8])
    exact_factorisation(model)
    tokens, labels, pos_a = induction_batch(8, 8, 2048, seed=98, step=0)
    ones = {n: torch.ones(2048, 8, 32) for n in model.names}
    target_acc = accuracy(model, tokens, labels)
    assert masked_accuracy(model, tokens, labels, ones) == pytest.approx(target_acc, abs=1e-3)
    for layer in (0, 1):
        ablated = {n: torch.zeros(2048, 8, 32) for n in model.names if n.startswith(f"blocks.{layer}.")}
        assert masked_accuracy(model, tokens, labels, ablated) < 0.5
    by_pos = ci_by_position(model.ci_of(tokens), pos_a)
    assert by_pos["blocks.0.attn.q_proj"].shape == (4, 32)


def test_ablations_remove_components_from_the_target_weights(tiny_target):
    """Ablation results equal the target with U_c V_c subtracted from its weight (or a whole weight
    zeroed): the other modules run at the target's weights, not at CI masks, which are computed from
    the target's activations and would leak what the ablation removed."""
    model = ComponentModel(copy.deepcopy(tiny_target), {"blocks.*.attn.*_proj": 32}, {}, "vector_mlp", [8])
    exact_factorisation(model)
    tokens, labels, _ = induction_batch(8, 8, 1024, seed=97, step=0)
    out = ih_metrics(model, SimpleNamespace(spd=SimpleNamespace(ci_threshold=0.0)), tokens, labels, ablate_each=True)
    with torch.no_grad():
        v0 = model.decomposed["blocks.0.attn.v_proj"].original.weight
        kept = v0.clone()
        v0.zero_()
        assert accuracy(model.target, tokens, labels) == pytest.approx(out["acc_module_ablated/blocks.0.attn.v_proj"])
        v0.copy_(kept)
        name, c = out["top_induction_component"].split(":")
        U, V = model.decomposed[name].components.factors()
        model.decomposed[name].original.weight -= U[:, int(c), None] @ V[None, int(c)]
        assert accuracy(model.target, tokens, labels) == pytest.approx(out["acc_without_top_induction_component"],
                                                                       abs=2e-3)


def test_script_tiny_run(tmp_path):
    overrides = [f"target.{k}={v}" for k, v in TINY.items()] + [
        "target.min_accuracy=0", f"target.path={tmp_path / 't.pt'}", "target.steps=200",
        "spd.steps=30", "spd.eval_every=15", "spd.batch_size=64", "spd.eval_batch_size=64", "n_eval=128",
        "spd.faithfulness_warmup_steps=10"]
    proc = subprocess.run([sys.executable, str(ROOT / "ih_decomposition.py"), str(ROOT / "configs/ih.yaml"),
                           *overrides, "--out", str(tmp_path / "run")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    for key in ["acc_target", "acc_ci_masked", "acc_layer0_ablated", "acc_layer1_ablated", "mean_l0",
                "top_prev_token_component", "top_induction_component", "acc_without_top_induction_component"]:
        assert key in results, key
    assert results["top_prev_token_component"].startswith("blocks.0.")
    assert results["top_induction_component"].startswith("blocks.1.")
    for fig in ["attention_patterns.png", "ci_by_position.png"]:
        assert (tmp_path / "run/figures" / fig).is_file()


@pytest.mark.slow
def test_default_config_finds_each_mechanism_in_one_component(tmp_path):
    """The default run (about 8 minutes on 2 CPU cores): the CI-masked model keeps the target's accuracy
    at an L0 far below C, and removing the single most important layer-0 (previous-token) or layer-1
    (induction) component from the target breaks the task."""
    proc = subprocess.run([sys.executable, str(ROOT / "ih_decomposition.py"), str(ROOT / "configs/ih.yaml"),
                           "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    assert results["acc_target"] >= 0.95
    assert results["acc_ci_masked"] >= 0.95 * results["acc_target"]
    assert results["mean_l0"] <= 16 / 4
    assert results["acc_without_top_prev_token_component"] < 0.5
    assert results["acc_without_top_induction_component"] < 0.5
