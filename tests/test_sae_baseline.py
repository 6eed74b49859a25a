"""sae_baseline.py and sparse_activations.py: each sparse activation's forward and backward on hand-checked
tensors, the decoder-norm projection, the dead-latent loss, and short end-to-end runs of both modes with resume."""

import json
import math
import shutil
import sys

import pytest
import torch

from analysis.compare_methods import (dictionary_ablation_effects, effect_matches, n_matched, plot_classifier,
                                      recovered, spd_ablation_effects)
from sae_baseline import Dictionary, DictionaryConfig, check_k, main, module_io
from sparse_activations import JumpReLU, abs_topk, batch_topk_relu, topk_relu
from spd_common import ComponentModel, Experiment, SPDConfig
from spd_config import SPDError
from train_targets.train_mnist import MLPClassifier


def grad_of(fn, pre: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pre = pre.clone().requires_grad_(True)
    out = fn(pre)
    (out * upstream).sum().backward()
    return out.detach(), pre.grad


def test_topk_keeps_the_k_largest_relud_and_routes_gradient_to_them():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-1.0, -2.0, -3.0, 0.1]])
    up = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    z, g = grad_of(lambda p: topk_relu(p, 2), pre, up)
    assert torch.equal(z, torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.1]]))
    # kept and positive: the upstream gradient; kept but negative (-1 in row 2): ReLU'd, no gradient
    assert torch.equal(g, torch.tensor([[1.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 8.0]]))


def test_batch_topk_keeps_k_times_batch_over_the_whole_batch():
    pre = torch.tensor([[5.0, 1.0], [0.5, 0.2], [4.0, 3.0]])
    z, g = grad_of(lambda p: batch_topk_relu(p, 1), pre, torch.ones(3, 2))
    # the 3 largest of the batch are 5, 4, 3: example 0 keeps one, example 1 none, example 2 two
    assert torch.equal(z, torch.tensor([[5.0, 0.0], [0.0, 0.0], [4.0, 3.0]]))
    assert torch.equal(g, torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    # k below 1: round(0.34 x 3) = 1 latent in the whole batch
    assert torch.equal(batch_topk_relu(pre, 0.34), torch.tensor([[5.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))


def test_abs_topk_keeps_the_largest_magnitudes_with_their_sign():
    z, g = grad_of(lambda p: abs_topk(p, 2), torch.tensor([[-3.0, 1.0, 2.0]]), torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.equal(z, torch.tensor([[-3.0, 0.0, 2.0]]))
    assert torch.equal(g, torch.tensor([[1.0, 0.0, 3.0]]))


def test_abs_topk_with_a_k_per_example():
    pre = torch.tensor([[-3.0, 1.0, 2.0], [0.5, -4.0, 1.0]])
    z, g = grad_of(lambda p: abs_topk(p, torch.tensor([1, 2])), pre, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    # row 0 keeps its largest magnitude (-3); row 1 its two largest (-4, then 1 over 0.5), signs kept
    assert torch.equal(z, torch.tensor([[-3.0, 0.0, 0.0], [0.0, -4.0, 1.0]]))
    assert torch.equal(g, torch.tensor([[1.0, 0.0, 0.0], [0.0, 5.0, 6.0]]))


def test_per_example_k_is_log_uniform_in_range_and_each_example_keeps_its_k_largest():
    cfg = DictionaryConfig(module="m", activation="abstopk", n_latents=16, k=4, k_min=2, k_max=8)
    dic = Dictionary(8, 8, cfg, SPDConfig())
    torch.manual_seed(0)
    ks = dic.sample_k(torch.Size([40_000]))
    assert ks.min() == 2 and ks.max() == 8
    # P(k) = log((k + 1) / k) / log(9 / 2): 0.270 for k = 2, 0.078 for k = 8
    freq = torch.bincount(ks, minlength=9)[2:].float() / len(ks)
    expected = torch.tensor([math.log((k + 1) / k) / math.log(4.5) for k in range(2, 9)])
    assert torch.allclose(freq, expected, atol=0.01)
    x = torch.randn(64, 8)
    torch.manual_seed(1)
    z = dic.encode(x)[0]
    torch.manual_seed(1)  # the same draw: pre-activations take no randomness
    ks, pre = dic.sample_k(torch.Size([64])), dic.pre(x).detach()
    assert len(set(ks.tolist())) > 3
    for row, k, p in zip(z.detach(), ks.tolist(), pre):
        kept = sorted(range(16), key=lambda c: -abs(p[c].item()))[:k]  # by hand: sorted magnitudes
        assert sorted(row.nonzero().flatten().tolist()) == sorted(kept)
        assert torch.equal(row[kept], p[kept])
    dic.eval()
    assert ((dic.encode(x)[0] != 0).sum(-1) == 4).all()  # at eval, k for every example
    for bad in (dict(k_min=2), dict(k_min=9, k_max=8), dict(k_min=2, k_max=17), dict(k_min=2, k_max=8, activation="topk")):
        with pytest.raises(SPDError, match="a per-example k needs both"):
            check_k(DictionaryConfig(module="m", n_latents=16, **(dict(activation="abstopk") | bad)))


def test_jumprelu_and_its_l0_straight_through_threshold_gradients():
    pre = torch.tensor([[0.5, 2.05, 3.0]], requires_grad=True)
    theta = torch.tensor([1.0, 2.0, 1.0], requires_grad=True)
    z = JumpReLU.apply(pre, theta, 0.2)
    assert torch.allclose(z, torch.tensor([[0.0, 2.05, 3.0]]))  # below its threshold: 0; above: pre itself
    z.sum().backward()
    assert torch.equal(pre.grad, torch.tensor([[0.0, 1.0, 1.0]]))
    # only latent 1 lies within eps/2 = 0.1 of its threshold: d/dtheta = -theta / eps = -2 / 0.2
    assert torch.allclose(theta.grad, torch.tensor([0.0, -10.0, 0.0]))
    pre.grad, theta.grad = None, None
    l0 = JumpReLU.apply(pre, theta, 0.2, True)  # its L0 term
    assert torch.equal(l0, torch.tensor([[0.0, 1.0, 1.0]]))
    l0.sum().backward()
    assert torch.equal(pre.grad, torch.zeros(1, 3))  # the L0 pushes thresholds only
    assert torch.allclose(theta.grad, torch.tensor([0.0, -5.0, 0.0]))  # -1 / eps


def test_jumprelu_dictionary_passes_the_threshold_gradient_to_log_threshold():
    dic = Dictionary(2, 2, DictionaryConfig(module="m", activation="jumprelu", n_latents=2, threshold_init=1.0,
                                            bandwidth=0.2), SPDConfig())
    with torch.no_grad():
        dic.W_enc.copy_(torch.eye(2))
    z, terms = dic.encode(torch.tensor([[1.05, 3.0]]))
    (z.sum() + terms["sparsity"]).backward()
    # latent 0 is in the window: -(theta / eps) - 1 / eps = -10, times dtheta/dlog = theta = 1
    assert torch.allclose(dic.log_threshold.grad, torch.tensor([-10.0, 0.0]))


def test_decoder_gradient_projection_and_renormalisation():
    dic = Dictionary(2, 2, DictionaryConfig(module="m", n_latents=2), SPDConfig())
    with torch.no_grad():
        dic.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    dic.W_dec.grad = torch.tensor([[2.0, 3.0], [1.0, 1.0]])
    dic.project_decoder_grad()
    # the part along each row goes: [2, 3] - 2 [1, 0]; [1, 1] - 1.4 [0.6, 0.8]
    assert torch.allclose(dic.W_dec.grad, torch.tensor([[0.0, 3.0], [0.16, -0.12]]))
    assert torch.allclose((dic.W_dec.grad * dic.W_dec).sum(-1), torch.zeros(2), atol=1e-6)
    with torch.no_grad():
        dic.W_dec.sub_(0.5 * dic.W_dec.grad)
    dic.normalize_decoder()
    assert torch.allclose(dic.W_dec.norm(dim=-1), torch.ones(2))
    assert torch.allclose(dic.W_dec[0], torch.tensor([1.0, -1.5]) / 3.25 ** 0.5)  # [1, 0] - 0.5 [0, 3], unit


def test_dead_latents_reconstruct_the_residual():
    cfg = DictionaryConfig(module="m", activation="topk", k=1, n_latents=2, aux_k=1, dead_steps=10, aux_coeff=0.5)
    dic = Dictionary(2, 2, cfg, SPDConfig())
    with torch.no_grad():
        dic.W_enc.copy_(torch.eye(2))
        dic.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    dic.steps_since_fired.fill_(10)  # both dead; latent 0 fires in this batch and comes back
    x = torch.tensor([[1.0, 0.5]])
    losses = dic.losses(x, x)
    assert dic.steps_since_fired.tolist() == [0, 11]
    # top-1 keeps latent 0: y^ = [1, 0], residual [0, 0.5]. Dead latent 1 (pre 0.5) writes 0.5 [0.6, 0.8]:
    # MSE((0.3, 0.4), (0, 0.5)) = 0.05, over the residual's mean square 0.125
    assert losses["recon"].item() == pytest.approx(0.125)
    assert losses["aux"].item() == pytest.approx(0.4)
    assert losses["total"].item() == pytest.approx(0.125 + 0.5 * 0.4)
    losses["total"].backward()
    assert dic.W_dec.grad[1].abs().sum() > 0  # only through the auxiliary loss


def test_stochastic_latents_are_ci_masked_at_eval_and_between_ci_and_one_in_training():
    torch.manual_seed(0)
    dic = Dictionary(2, 2, DictionaryConfig(module="m", activation="stochastic", n_latents=2), SPDConfig())
    x = torch.randn(64, 2)
    pre = dic.pre(x).relu()
    z, terms = dic.encode(x)
    # the mask ci + (1 - ci) u lies in [ci, 1]; the lower-leaky ci may be slightly negative, so no clamp
    assert (z <= pre + 1e-6).all() and (z >= pre * terms["ci"] - 1e-6).all()
    dic.eval()
    z, terms = dic.encode(x)
    assert torch.allclose(z, pre * terms["ci"])


def test_features_recovered_one_to_one_and_duplicates():
    # latents x features. Latent 0 and 1 both sit on feature 0 (one is a duplicate), latent 2 on feature 1
    # at 0.95, latent 3 half-way between features 1 and 2 (0.7 each: serves neither), feature 2 unrecovered
    cos = torch.tensor([[0.99, 0.1, 0.0], [0.97, 0.0, 0.1], [0.1, 0.95, 0.2], [0.0, 0.7, 0.7]])
    assert recovered(cos, 0.9) == (2, 1)
    assert recovered(cos, 0.96) == (1, 1)
    assert recovered(cos[2:], 0.9) == (1, 0)  # no latent at feature 0 any more
    assert recovered(torch.zeros(0, 3), 0.9) == (0, 0)


def test_latents_match_the_subcomponents_whose_ablation_changes_the_output_alike():
    torch.manual_seed(0)
    comp_fx = torch.randn(3, 20, 10)  # 3 subcomponents: the change of 10 logits on 20 images when ablated
    latent_fx = torch.stack([comp_fx[2], 0.5 * comp_fx[0], torch.randn(20, 10), comp_fx[2]])
    m = effect_matches(latent_fx, comp_fx)
    # copies (at any scale) match their original at cosine 1; the random one matches nothing at 0.5
    assert m["best"][[0, 1, 3]].tolist() == [2, 0, 2]
    assert torch.allclose(m["best_cos"][[0, 1, 3]], torch.ones(3)) and m["best_cos"][2] < 0.5
    assert n_matched(m, 0.9) == (3, 2)  # 3 latents matched, 2 subcomponents (2 is matched twice)
    assert n_matched(m, 1.01) == (0, 0)
    assert n_matched(effect_matches(latent_fx, comp_fx[:0]), 0.5) == (0, 0)  # no alive subcomponent


def test_classifier_ablation_effects_on_a_hand_built_pair(tmp_path):
    """Identity layers and x = (1, 0.5): fc1 gives h = (1, 0.5). SPD on fc2, subcomponents = the standard
    basis, CI = the inner act (a linear 1 -> 1 CI function): CI (1, 0.5), masked fc2 out and logits (1, 0.25);
    without subcomponent 0: (0, 0.25), without 1: (1, 0). A transcoder on fc2 with identity encoder and
    decoder: z = h, logits (1, 0.5); without latent 0: (0, 0.5), without 1: (1, 0). Each latent's effect
    lies along one subcomponent's: latent i matches subcomponent i at cosine 1."""
    target = MLPClassifier(d_in=2, d_hidden=2, n_classes=2)
    with torch.no_grad():
        for fc in (target.fc1, target.fc2, target.fc3):
            fc.weight.copy_(torch.eye(2))
            fc.bias.zero_()
    model = ComponentModel(target, {"fc2": 2}, {}, "mlp", ci_hidden=[])
    with torch.no_grad():
        model.components["fc2"].U.copy_(torch.eye(2))
        model.components["fc2"].V.copy_(torch.eye(2))
        weight, bias = model.ci_fns["fc2"].layers
        weight.fill_(1.0)
        bias.zero_()
    x, both = torch.tensor([[1.0, 0.5]]), torch.tensor([0, 1])
    comp_fx = spd_ablation_effects(model, "fc2", x, both, lambda out: out)
    assert torch.allclose(comp_fx, torch.tensor([[[1.0, 0.0]], [[0.0, 0.25]]]))
    cfg = DictionaryConfig(module="fc2", mode="transcoder", activation="relu", n_latents=2)
    dic = Dictionary(2, 2, cfg, SPDConfig()).eval()
    with torch.no_grad():
        dic.W_enc.copy_(torch.eye(2))
        dic.W_dec.copy_(torch.eye(2))
    latent_fx = dictionary_ablation_effects(Experiment(model, None, None), cfg, dic, x, both)
    assert torch.allclose(latent_fx, torch.tensor([[[1.0, 0.0]], [[0.0, 0.5]]]))
    m = effect_matches(latent_fx, comp_fx)
    assert m["best"].tolist() == [0, 1] and torch.allclose(m["best_cos"], torch.ones(2))
    per_class = torch.eye(10)[:, :2]  # latent / subcomponent i fires for digit i only
    plot_classifier(per_class, both, per_class, both, m, "fc2", 0.9, tmp_path / "pair.png")
    assert (tmp_path / "pair.png").stat().st_size > 0


def test_multi_input_encoder_reads_the_concatenated_locations():
    """x = (1, 2) through fc1 = [[1, -1], [2, 0]]: fc1's output (-1, 2), fc2's input (0, 2); fc2 and fc3 the
    identity. A transcoder on fc2 reading [fc1, fc1:output, fc2] sees (1, 2, -1, 2, 0, 2)."""
    target = MLPClassifier(d_in=2, d_hidden=2, n_classes=2)
    with torch.no_grad():
        for fc, w in ((target.fc1, [[1.0, -1.0], [2.0, 0.0]]), (target.fc2, torch.eye(2)), (target.fc3, torch.eye(2))):
            fc.weight.copy_(torch.as_tensor(w))
            fc.bias.zero_()
    exp = Experiment(ComponentModel(target, {"fc2": 2}, {}, "mlp", ci_hidden=[]), None, None)
    x = torch.tensor([[1.0, 2.0]])
    multi = DictionaryConfig(module="fc2", mode="transcoder", activation="relu", n_latents=2,
                             inputs=["fc1", "fc1:output", "fc2"])
    out, a, y = module_io(exp, multi, x)
    assert torch.equal(a, torch.tensor([[1.0, 2.0, -1.0, 2.0, 0.0, 2.0]]))
    assert torch.equal(y, torch.tensor([[0.0, 2.0]])) and torch.equal(out, torch.tensor([[0.0, 2.0]]))
    # spliced in: latent 0 reads pixel 0 (1), latent 1 fc1's output 1 (2); decoder the identity -> logits (1, 2)
    dic = Dictionary(6, 2, multi, SPDConfig()).eval()
    with torch.no_grad():
        dic.W_enc.zero_()
        dic.W_enc[0, 0] = dic.W_enc[3, 1] = 1.0
        dic.W_dec.copy_(torch.eye(2))
        dic.b_dec.zero_()
    assert torch.equal(module_io(exp, multi, x, dic)[0], torch.tensor([[1.0, 2.0]]))
    # one input, named, is the single-input transcoder: same activations, same spliced output
    single, one = (DictionaryConfig(module="fc2", mode="transcoder", activation="relu", n_latents=2, inputs=i)
                   for i in ([], ["fc2"]))
    dic1 = Dictionary(2, 2, single, SPDConfig()).eval()
    for a, b in zip(module_io(exp, single, x, dic1) + module_io(exp, single, x),
                    module_io(exp, one, x, dic1) + module_io(exp, one, x)):
        assert torch.equal(a, b)
    with pytest.raises(SPDError, match="fc3:input comes after fc2's output"):
        module_io(exp, DictionaryConfig(module="fc2", mode="transcoder", inputs=["fc3"]), x, dic1)
    with pytest.raises(SPDError, match="'fc9' is not a module"):
        module_io(exp, DictionaryConfig(module="fc2", mode="transcoder", inputs=["fc9"]), x)
    with pytest.raises(SPDError, match="fc1:middle names no location"):
        module_io(exp, DictionaryConfig(module="fc2", mode="transcoder", inputs=["fc1:middle"]), x)


def test_multi_input_transcoder_on_the_digits_end_to_end(tmp_path, monkeypatch, capsys):
    """configs/sae_digits_multi.yaml, shortened: the encoder reads 128 numbers; with inputs [fc2] a run
    lands where the single-input run does."""
    import yaml

    overrides = [f"target.path={tmp_path}/digits.pt", "target.steps=300", "target.min_accuracy=0.5"]
    results = {}
    for name, inputs in (("multi", None), ("one", ["fc2"]), ("single", [])):
        cfg = yaml.safe_load(open("configs/sae_digits_multi.yaml"))
        cfg["experiment_overrides"] = overrides
        cfg["spd"] |= {"steps": 30, "eval_every": 30, "checkpoint_every": 30}
        if inputs is not None:
            cfg["dictionary"]["inputs"] = inputs
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        results[name] = run(monkeypatch, capsys, str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name))
    state = torch.load(tmp_path / "multi" / "checkpoints" / "final.pt", weights_only=True)["components"]
    assert state["W_enc"].shape == (128, 64) and 0 < results["multi"]["fvu"] < 1
    assert results["one"]["fvu"] == results["single"]["fvu"] and results["one"]["l0"] == results["single"]["l0"]


def write_config(tmp_path, name: str, experiment: str, script: str, overrides: list[str], dictionary: dict) -> str:
    import yaml

    cfg = {"experiment": experiment, "experiment_script": script, "experiment_overrides": overrides,
           "dictionary": dictionary,
           "spd": {"steps": 60, "batch_size": 256, "eval_batch_size": 512, "lr": 3e-3, "eval_every": 30,
                   "checkpoint_every": 30, "log_every": 10, "importance_minimality_coeff": 1e-3}}
    cfg["dictionary"]["n_eval_batches"] = 2
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run(monkeypatch, capsys, *argv: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["sae_baseline.py", *argv])
    main()
    return json.loads(open(capsys.readouterr().out.strip().splitlines()[-1]).read())


def test_sae_on_tms_hidden_layer_end_to_end_and_resume_is_exact(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path, "sae_tms", "configs/tms_5-2.yaml", "tms_decomposition.py",
                       [f"target.path={tmp_path}/tms.pt", "target.steps=500", "target.batch_size=256"],
                       {"module": "linear1", "mode": "sae", "n_latents": 5, "activation": "topk", "k": 1})
    res = run(monkeypatch, capsys, cfg, "--out", str(tmp_path / "a"))
    assert res["steps"] == 60 and res["l0"] == pytest.approx(1.0) and len(res["density"]) == 5
    assert res["fvu"] < 0.5 and res["spliced_mse_over_target_var"] < 1.0  # better than nothing in 60 steps
    assert (tmp_path / "a" / "figures" / "latents.png").is_file()
    # interrupted after step 30: drop what came after, resume, and land on the same dictionary
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("results.json", "checkpoints/final.pt"):
        (tmp_path / "b" / name).unlink()
    resumed = run(monkeypatch, capsys, "--resume", str(tmp_path / "b"))
    assert resumed["resumed_from_step"] == 30 and resumed["fvu"] == res["fvu"]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "final.pt", weights_only=True)["components"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stochastic_transcoder_on_a_residual_mlp_end_to_end(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path, "tc_resid", "configs/resid_mlp1.yaml", "resid_mlp_decomposition.py",
                       [f"target.path={tmp_path}/resid.pt", "target.n_features=10", "target.d_embed=20",
                        "target.d_mlp=10", "target.feature_probability=0.1", "target.steps=500",
                        "target.batch_size=256", "spd.modules={layers.*.mlp_in: 4}"],
                       {"module": "layers.0", "mode": "transcoder", "n_latents": 20, "activation": "stochastic"})
    res = run(monkeypatch, capsys, cfg, "--out", str(tmp_path / "tc"))
    assert res["steps"] == 60 and 0 < res["l0"] < 20
    assert res["fvu"] < 1.0 and res["spliced_mse_over_target_var"] < 1.0


def test_spd_fields_a_dictionary_does_not_use_are_refused_and_on_nan_skip_is_honoured(tmp_path, monkeypatch, capsys):
    """The SAE trains in the shell `optimize` uses: a field of SPD's own (PGD, micro-batches, compile) is a
    one-line error, not silently ignored; on_nan=skip skips a nan step and counts it, as SPD runs do."""
    import sae_baseline
    from spd_run import run_main

    cfg = write_config(tmp_path, "sae_tms", "configs/tms_5-2.yaml", "tms_decomposition.py",
                       [f"target.path={tmp_path}/tms.pt", "target.steps=500", "target.batch_size=256"],
                       {"module": "linear1", "mode": "sae", "n_latents": 5, "activation": "topk", "k": 1})
    for override in ("spd.pgd_recon_coeff=1.0", "spd.grad_accum_steps=2", "spd.compile=true"):
        monkeypatch.setattr(sys, "argv", ["sae_baseline.py", cfg, override, "--out", str(tmp_path / "bad")])
        with pytest.raises(SystemExit):
            run_main(main)
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"does not use {override.split('=')[0]}" in err, err
    losses = sae_baseline.Dictionary.losses

    def nan_at_step_5(self, x, y):
        out = losses(self, x, y)
        nan_at_step_5.calls += 1
        return out | {"total": out["total"] * float("nan")} if nan_at_step_5.calls == 6 else out

    nan_at_step_5.calls = 0
    monkeypatch.setattr(sae_baseline.Dictionary, "losses", nan_at_step_5)
    res = run(monkeypatch, capsys, cfg, "spd.on_nan=skip", "--out", str(tmp_path / "skip"))
    assert res["skipped_steps"] == 1 and res["steps"] == 60
