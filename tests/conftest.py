"""Fixtures shared by several test files."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_lm_run(tmp_path_factory):
    """A 4-step decomposition of a tiny built Llama (configs/tiny_llama.yaml shrunk: d_model 16, 3 training
    steps, the MLP projections at C = 8), its run dir as lm_decomposition.py writes it (less the figures), and
    its harvest (2 batches): run in this process, so that it shares the imports of the other LM tests."""
    import lm_decomposition
    from analysis.harvest import harvest
    from spd_common import optimize
    from spd_run import parse_cli

    tmp = tmp_path_factory.mktemp("tiny_lm")
    t = tmp / "tl"
    cfg, run_dir = parse_cli(lm_decomposition.LMConfig, "tiny LM", [
        str(ROOT / "configs/tiny_llama.yaml"), f"model={t}", f"target.path={t}", "target.n_train_stories=200",
        "target.n_test_stories=40", "target.d_model=16", "target.d_mlp=32", "target.n_heads=2", "target.seq_len=32",
        "target.steps=3", "target.batch_size=4", "target.vocab_size=300",
        f"data.data_files={{train: {t}/corpus/train.jsonl, test: {t}/corpus/test.jsonl}}", "data.seq_len=32",
        "spd.steps=4", "spd.eval_every=2", "spd.batch_size=4", "spd.eval_batch_size=4", "spd.threads=1",
        "spd.faithfulness_warmup_steps=2", "spd.modules={model.layers.*.mlp.*: 8}", "--out", str(tmp / "run")])
    exp = lm_decomposition.build(cfg)
    optimize(exp.model, cfg.spd, exp.train_batch, exp.eval_batch, run_dir, output_fn=exp.output_fn)
    harvest(run_dir, run_dir / "analysis", n_batches=2)
    return run_dir
