"""Every decomposable layer of tiny random `transformers` models (no download) decomposes correctly, or is
refused in one line: plain layers, subclasses with their own forward (Gemma's scaled embedding, OPT's and
BioGPT's offset position embeddings), and the per-expert matrices of MoE experts modules."""

import pytest
import torch
import torch.nn as nn
import transformers as T

from spd_common import ComponentModel, SPDConfig, decomposable_modules, training_losses
from spd_config import SPDError
from spd_layers import DecomposedExperts, DecomposedModule

VOCAB = 50
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=16)
ARCHS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**LLAMA_LIKE)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                                   bos_token_id=0, eos_token_id=0)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=2, num_attention_heads=2,
                                                             max_position_embeddings=16)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**LLAMA_LIKE, head_dim=8)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                                num_attention_heads=2, max_position_embeddings=16,
                                                word_embed_proj_dim=16)),
    "biogpt": lambda: T.BioGptForCausalLM(T.BioGptConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=2, num_attention_heads=2,
                                                         max_position_embeddings=16)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**LLAMA_LIKE, moe_intermediate_size=8, num_experts=4,
                                                                shared_expert_intermediate_size=16,
                                                                num_experts_per_tok=2)),
    # experts stored transposed, with biases and its own clamped, interleaved SwiGLU
    "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(**LLAMA_LIKE, head_dim=8, num_local_experts=4,
                                                          num_experts_per_tok=2)),
}


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    target = ARCHS[arch]().eval()  # eval: no dropout
    with torch.no_grad():  # some parameters start at 0 (OPT's biases, GPT-OSS's router): make them count
        for p in target.parameters():
            if not p.any():
                p.normal_(0, 0.02)  # the usual initializer_range
    return target


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_layer_decomposes_exactly(arch):
    """Masks 1 with the delta component reproduce the target; each module alone, masked without the delta,
    changes the output (its components really stand in); CI masks run."""
    target = build(arch)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = target(tokens).logits
    model = ComponentModel(target, {"*": 4}, {}, "mlp", [4])  # "*": every decomposable layer
    assert len(model.names) == len(decomposable_modules(build(arch)))
    ci = model.ci_of(tokens)
    ones = {n: torch.ones_like(g) for n, g in ci.items()}
    deltas = {n: torch.ones(g.shape[:-1]) for n, g in ci.items()}
    with torch.no_grad():
        with model.masked(ones, deltas):
            torch.testing.assert_close(model(tokens).logits, before, atol=1e-5, rtol=1e-5)
        for n in model.names:
            with model.masked({n: ones[n]}):
                assert not torch.allclose(model(tokens).logits, before, atol=1e-6), n
        with model.masked(ci):
            assert torch.isfinite(model(tokens).logits).all()
        torch.testing.assert_close(model(tokens).logits, before)  # no masks: the target again
    restored = model.restore_target()  # the original modules back in place, MoE experts modules too
    assert decomposable_modules(restored).keys() == decomposable_modules(build(arch)).keys()
    assert not any(isinstance(m, (DecomposedModule, DecomposedExperts)) for m in restored.modules())
    with torch.no_grad():
        assert torch.equal(restored(tokens).logits, before)


def test_own_forward_layers_see_their_base_inputs():
    """Gemma's embedding scales after the masked lookup; OPT's position embedding is called with the
    attention mask and looks up positions + 2: those positions are the module's input (for CI)."""
    gemma = ComponentModel(build("gemma"), {"model.embed_tokens": 4}, {}, "mlp", [4])
    tokens = torch.randint(0, VOCAB, (2, 5))
    mod = gemma.decomposed["model.embed_tokens"]
    _, inputs = gemma.run_target(tokens)
    assert torch.equal(inputs["model.embed_tokens"], tokens)
    mask = torch.rand(2, 5, 4)
    U, V = mod.components.factors()
    with torch.no_grad(), gemma.masked({"model.embed_tokens": mask}):
        out = mod(tokens)
    torch.testing.assert_close(out, mod.original.embed_scale * ((V.T[tokens] * mask) @ U.T))

    opt = ComponentModel(build("opt"), {"model.decoder.embed_positions": 4}, {}, "mlp", [4])
    _, inputs = opt.run_target(tokens)
    assert inputs["model.decoder.embed_positions"].tolist() == [list(range(2, 7))] * 2


@pytest.mark.parametrize("arch", ["gemma", "opt", "mixtral"])
def test_every_loss_trains_every_component(arch):
    """One step's losses (layerwise ones reuse the inner acts) give every component a finite, nonzero gradient."""
    model = ComponentModel(build(arch), {"*": 4}, {}, "mlp", [4])
    cfg = SPDConfig(output_loss="kl", ci_masked_recon_coeff=1.0)  # no faithfulness: gradients via the forward
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    training_losses(model, cfg, tokens, 0.0, lambda out: out.logits)["total"].backward()
    for n, p in model.components.named_parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_one_expert_by_name_with_its_own_C():
    model = ComponentModel(build("mixtral"), {"model.layers.0.mlp.experts.gate_up_proj.3": 6,
                                              "model.layers.*.mlp.experts.down_proj.*": 5}, {}, "mlp", [4])
    assert model.C["model.layers.0.mlp.experts.gate_up_proj.3"] == 6 and len(model.C) == 9
    mod = model.decomposed["model.layers.0.mlp.experts.gate_up_proj.3"]
    assert mod.target_weight().shape == (64, 16) and mod.components.U.shape == (64, 6)  # (2 * d_mlp, d)
    tokens = torch.randint(0, VOCAB, (2, 7))
    _, inputs = model.run_target(tokens)
    x = inputs["model.layers.0.mlp.experts.gate_up_proj.3"]  # (tokens, d): 0 where expert 3 was not picked
    assert x.shape == (14, 16) and 0 < (x.abs().sum(-1) > 0).sum() < 14


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * (x @ self.weight.T)  # no F.linear call to put components in


class ByHand(nn.Linear):
    def forward(self, x):
        return x @ self.weight.T + self.bias  # Falcon's FalconLinear: nn.Linear's function, written out


class TwoInputs(nn.Linear):
    def forward(self, x, y):
        return super().forward(x + y)


def test_overridden_forwards_are_run_or_refused():
    net = nn.Sequential(ByHand(3, 4))
    model = ComponentModel(net, {"0": 4}, {}, "mlp", [4])
    assert not model.decomposed["0"].own_forward
    for layer, why in [(Doubled(3, 4), "without one F.linear / F.embedding call"),
                       (TwoInputs(3, 4), "and fails on a probe input")]:
        with pytest.raises(SPDError, match=rf"module '0' \({type(layer).__name__}\) overrides Linear.forward {why}"):
            ComponentModel(nn.Sequential(layer), {"0": 4}, {}, "mlp", [4])
