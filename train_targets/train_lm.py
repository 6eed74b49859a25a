"""Build the offline language-model target: a story corpus, a BPE tokenizer and a tiny Llama.

Nothing is downloaded. Short children's stories are generated from the grammar below (a story
keeps its hero, friend, place and object, so predicting them needs attention back to where they
were introduced); a byte-level BPE tokenizer is trained on them with `tokenizers`, and a 2-layer
`LlamaForCausalLM` on the packed token stream. Model and tokenizer are saved with `save_pretrained`
and the corpus as JSON lines, so `lm_decomposition.py` loads all three through the same
`from_pretrained` / `load_dataset` calls as a hub model and dataset.

    python -m train_targets.train_lm configs/tiny_llama.yaml   # reads the `target:` section

Also home of the LM data helpers `lm_decomposition.py` shares: `pack` and `TokenBatches`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from spd_config import SPDError, option
from spd_run import step_generator, target_main

EOS = "<|endoftext|>"


@dataclass
class TinyLMConfig:
    path: str = option("targets/tiny_llama", "directory the model, tokenizer and corpus/ are saved in")
    n_train_stories: int = option(20_000, "generated stories in corpus/train.jsonl", ge=1)
    n_test_stories: int = option(1_000, "generated stories in corpus/test.jsonl", ge=1)
    vocab_size: int = option(512, "BPE vocabulary size (at most; the grammar may need fewer)", ge=258)
    d_model: int = option(64, "residual stream width", ge=8)
    d_mlp: int = option(256, "SwiGLU MLP width", ge=1)
    n_layers: int = option(2, "transformer blocks", ge=1)
    n_heads: int = option(4, "attention heads", ge=1)
    seq_len: int = option(128, "training context length (also the model's max positions)", ge=2)
    steps: int = option(600, "training steps", ge=1)
    batch_size: int = option(32, "sequences per step", ge=1)
    lr: float = option(3e-3, "AdamW peak learning rate (linear warm-up, cosine decay)", gt=0)
    weight_decay: float = option(0.1, "AdamW weight decay", ge=0)
    seed: int = option(0, "seed of the corpus, the initial weights and the batches")


# ------------------------------------------------------------------------------------------------
# The story grammar
# ------------------------------------------------------------------------------------------------
GIRLS = ["Lily", "Mia", "Sue", "Anna", "Emma", "Lucy", "Zoe", "Amy", "Rose", "Ella"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Joe", "Dan"]
ANIMALS = ["cat", "dog", "bird", "frog", "bunny", "duck", "fox", "bear", "mouse", "puppy"]
PLACES = ["park", "garden", "forest", "beach", "farm", "lake", "hill", "yard", "zoo", "river"]
OBJECTS = ["ball", "kite", "box", "hat", "book", "toy", "cake", "shell", "flower", "stick", "rock", "boat",
           "drum", "cup", "star", "key"]
ADJS = ["red", "blue", "green", "yellow", "big", "small", "shiny", "soft", "old", "new", "pretty", "funny"]
HIDES = ["under a big tree", "behind a rock", "in the tall grass", "near the water", "on top of a hill",
         "inside an old box", "next to a fence"]
PROBLEMS = ["the wind took the {obj} up into a tree", "the {obj} fell into the water", "the {obj} broke in two",
            "a big dog ran off with the {obj}", "the {obj} got lost in the mud"]
FIXES = ["{friend} helped {obj_pron} get it back", "they worked together and fixed it",
         "{mom} came and helped them", "{friend} had a good idea and they tried it"]
FEEL_BAD = ["sad", "scared", "upset", "worried"]
FEEL_GOOD = ["happy", "glad", "proud", "excited"]


def story(rng: random.Random) -> str:
    """One story: characters and objects are drawn once and then referred back to."""
    girl = rng.random() < 0.5
    hero = rng.choice(GIRLS if girl else BOYS)
    he, his = ("she", "her") if girl else ("he", "his")
    friend = rng.choice([f"{'his' if not girl else 'her'} friend {rng.choice(GIRLS + BOYS)}",
                         f"a little {rng.choice(ANIMALS)}", f"{his} {rng.choice(['mom', 'dad', 'sister', 'brother'])}"])
    place, obj, adj = rng.choice(PLACES), rng.choice(OBJECTS), rng.choice(ADJS)
    mom = rng.choice(["Mom", "Dad", "Grandma", "a kind man"])
    cap = lambda s: s[0].upper() + s[1:]  # noqa: E731
    s = [rng.choice([f"Once upon a time, there was a {'girl' if girl else 'boy'} named {hero}.",
                     f"One day, {hero} went to the {place}.", f"There was a little {'girl' if girl else 'boy'} "
                     f"called {hero} who loved the {place}."])]
    s.append(rng.choice([f"{cap(he)} went to the {place} with {friend}.", f"{hero} and {friend} played at the {place}.",
                         f"{cap(he)} liked to play at the {place} with {friend}."]))
    s.append(f"{cap(he)} found a {adj} {obj} {rng.choice(HIDES)}.")
    s.append(rng.choice([f"{hero} was very {rng.choice(FEEL_GOOD)}.", f"\"Look at this {obj}!\" said {hero}.",
                         f"{hero} showed the {adj} {obj} to {friend}."]))
    if rng.random() < 0.7:
        s.append(f"But then {rng.choice(PROBLEMS).format(obj=obj)}.")
        s.append(f"{hero} was {rng.choice(FEEL_BAD)}.")
        s.append(cap(rng.choice(FIXES).format(friend=friend, obj_pron="him" if not girl else "her", mom=mom)) + ".")
    s.append(rng.choice([f"{hero} kept the {obj} and {he} was {rng.choice(FEEL_GOOD)}.",
                         f"From that day on, {hero} played with the {adj} {obj} every day.",
                         f"{hero} took the {obj} home and smiled.", f"{hero} and {friend} went home happy."]))
    return " ".join(s)


def write_corpus(cfg: TinyLMConfig, out: Path) -> dict[str, Path]:
    """corpus/{train,test}.jsonl, one {"text": story} per line, from one seeded generator."""
    rng = random.Random(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", cfg.n_train_stories), ("test", cfg.n_test_stories)):
        files[split] = out / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"text": story(rng)}) + "\n" for _ in range(n)))
    return files


# ------------------------------------------------------------------------------------------------
# LM data helpers (shared with lm_decomposition.py)
# ------------------------------------------------------------------------------------------------
def pack(token_lists: Iterable[list[int]], eos_id: int | None, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """Concatenate texts, each followed by EOS (if the tokenizer has one), and cut the stream into
    (N, seq_len) rows (the ragged tail is dropped); reading stops once max_tokens tokens are in."""
    sep = [] if eos_id is None else [eos_id]
    chunks, n_tokens = [], 0
    for ids in token_lists:
        chunks.append(torch.tensor(ids + sep))  # tensors, not one Python list: 8 bytes a token, not ~36
        n_tokens += len(chunks[-1])
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    stream = (torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long))[:max_tokens]
    n = len(stream) // seq_len
    if n == 0:
        raise SPDError(f"only {len(stream)} tokens: fewer than one sequence of seq_len {seq_len}")
    return stream[: n * seq_len].view(n, seq_len)


class TokenBatches:
    """Batch `step` of this rank: a function of (seed, step, rank) only, so a run is reproducible
    from its step and ranks need no shared state. Each epoch walks a fresh seeded permutation of
    the rows; the global batch of `batch_size` rows is split evenly across `world_size` ranks."""

    def __init__(self, data: Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        if batch_size % world_size:
            raise SPDError(f"batch size {batch_size} is not divisible by world size {world_size}")
        self.data, self.batch_size, self.seed, self.device = data, batch_size, seed, device
        self.rank, self.world_size = rank, world_size

    def __call__(self, step: int) -> Tensor:
        n = len(self.data)
        idx = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, pos = idx // n, idx % n
        rows = torch.empty_like(idx)
        for e in epochs.unique().tolist():  # at most two epochs meet in one batch (batch <= n)
            perm = torch.randperm(n, generator=step_generator(self.seed, e))
            rows[epochs == e] = perm[pos[epochs == e]]
        per_rank = self.batch_size // self.world_size
        return self.data[rows[self.rank * per_rank:(self.rank + 1) * per_rank]].to(self.device)


# ------------------------------------------------------------------------------------------------
# Tokenizer and model
# ------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) wrapped as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def build_llama(cfg: TinyLMConfig, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.seq_len, bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=False,
        use_cache=False))


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def build_tiny_lm(cfg: TinyLMConfig) -> None:
    """Corpus, tokenizer and trained model in cfg.path (built in a temp dir, then moved: an
    interrupted build never leaves a half-written target)."""
    final = Path(cfg.path)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    files = write_corpus(cfg, tmp / "corpus")
    texts = {s: [json.loads(line)["text"] for line in f.open()] for s, f in files.items()}
    tokenizer = train_tokenizer(texts["train"], cfg.vocab_size)
    data = {s: pack(tokenizer(t)["input_ids"], tokenizer.eos_token_id, cfg.seq_len) for s, t in texts.items()}

    torch.manual_seed(cfg.seed)
    model = build_llama(cfg, len(tokenizer), tokenizer.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    batches = TokenBatches(data["train"], cfg.batch_size, cfg.seed)
    warmup = max(cfg.steps // 20, 1)
    model.train()
    for step in range(cfg.steps):
        lr = cfg.lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = batches(step)
        loss = next_token_ce(model(x).logits, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"  step {step}: train CE {loss.item():.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        test = data["test"][:256]
        ce = next_token_ce(model(test).logits, test).item()
    unigram = torch.bincount(data["train"].flatten(), minlength=len(tokenizer)).float()
    unigram_ce = -(unigram / unigram.sum()).log()[test[:, 1:].flatten()].mean().item()
    print(f"Tiny Llama trained in {time.time() - t0:.0f} s: {sum(p.numel() for p in model.parameters())} params, "
          f"vocab {len(tokenizer)}, test CE {ce:.3f} nats (unigram {unigram_ce:.3f})")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "tiny_lm_config.json").write_text(json.dumps(vars(cfg), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


if __name__ == "__main__":
    target_main(TinyLMConfig, build_tiny_lm)
