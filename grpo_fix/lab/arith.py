"""Task 2, closer to LLM training: a small transformer pretrained in code on a synthetic arithmetic
language, then trained with GRPO from that checkpoint.

The language.  A prompt is a fixed-width addition ``"07+58="`` (operands 0..``max_operand``,
zero-padded, so every prompt has the same length and no padding moves the positions); a document
continues it with the answer, a free-form tail and the end-of-sequence token::

    07+58=65;...<eos>

The answer has 1 to 3 digits (variable length); the tail is ``;`` and 0..``tail_max`` (uniform)
filler dots: text whose length is free and carries no information, as the part of an LLM
completion that the verifier ignores.  The verifiable reward (:func:`answer_reward`) is 1 when
the text before the first ``;`` is the sum, else 0, so a correct completion can be any length.

The corpus is noisy, as web text is: a share ``noise`` (default 0.5) of the documents carry a
wrong answer, off by 1 or 10.  The pretrained policy reproduces that mix, so on a problem it has
learned it samples the right sum about half of the time; telling the right answer from the
plausible wrong ones is left to the verifier, the part of LLM post-training that GRPO does within
a few dozen steps.

The split.  All ``(max_operand + 1)^2`` problems are shuffled once (fixed seed); the first
``eval_problems`` are held out (never seen in pretraining or GRPO) and scored at the end of every
run; the rest are the pretraining and GRPO training pool.

The model: a Qwen2 decoder (:func:`grpo_fix.lab.toy.build_model`: RMSNorm, rotary positions,
SwiGLU, grouped-query attention) of ``num_layers`` x ``hidden_size`` (defaults 4 x 128, 0.59 M
parameters).  :func:`pretrained_policy` pretrains it by supervised next-token prediction on the
completions (AdamW, linear warm-up then cosine decay) for ``pretrain_steps`` steps and caches the
weights, keyed by a hash of the configuration, under ``$GRPO_FIX_CACHE`` (default
``~/.cache/grpo-fix``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import toy

DIGITS = "0123456789"
FILLER = "."
CHARS = DIGITS + "+=;" + FILLER


@dataclass(frozen=True)
class ArithConfig:
    """The language, the model and its pretraining (every field is part of the cache key)."""

    max_operand: int = 99
    noise: float = 0.5
    tail_max: int = 6
    eval_problems: int = 500
    hidden_size: int = 128
    num_layers: int = 4
    pretrain_steps: int = 1500
    pretrain_batch: int = 128
    pretrain_lr: float = 3e-3
    warmup_steps: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_operand <= 99:
            raise ValueError(f"max_operand must be in [1, 99] (two-digit operands), got {self.max_operand}")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {self.noise}")
        if self.tail_max < 0:
            raise ValueError(f"tail_max must be >= 0, got {self.tail_max}")
        if not 0 < self.eval_problems < (self.max_operand + 1) ** 2 // 2:
            raise ValueError(f"eval_problems must leave most problems for training, got {self.eval_problems}")

    @property
    def completion_len(self) -> int:
        """Longest document completion: 3 answer digits, ``;``, the tail and ``<eos>``."""
        return 3 + 1 + self.tail_max + 1

    def key(self) -> str:
        """A short hash of the configuration (the checkpoint's cache key)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def prompt_of(a: int, b: int) -> str:
    """The prompt of problem ``a + b`` (zero-padded operands)."""
    return f"{a:02d}+{b:02d}="


def solve(prompt: str) -> int:
    """The sum a prompt asks for (``ValueError`` for a string that is not a prompt)."""
    left, right = prompt.rstrip("=").split("+")
    return int(left) + int(right)


def answer_reward(prompt: str, completion: str) -> float:
    """1.0 when the completion's text before the first ``;`` is the sum, else 0.0 (the tail and
    its length do not count)."""
    return float(completion.split(";", 1)[0] == str(solve(prompt)))


def split_problems(cfg: ArithConfig) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` prompts: all problems shuffled with a fixed seed; the first
    ``eval_problems`` are held out."""
    n = cfg.max_operand + 1
    problems = [prompt_of(a, b) for a in range(n) for b in range(n)]
    random.Random(1234).shuffle(problems)
    return problems[cfg.eval_problems :], problems[: cfg.eval_problems]


def document_completion(prompt: str, rng: random.Random, cfg: ArithConfig) -> str:
    """A pretraining completion of ``prompt`` (no ``<eos>``): the answer, wrong with probability
    ``cfg.noise`` (off by 1 or 10 either way, never negative), ``;`` and 0..``cfg.tail_max``
    filler dots."""
    answer = solve(prompt)
    if rng.random() < cfg.noise:
        off = rng.choice((-10, -1, 1, 10))
        answer = answer + off if answer + off >= 0 else answer - off
    return f"{answer};{FILLER * rng.randint(0, cfg.tail_max)}"


def _pretraining_batch(
    tokenizer: Any, pool: list[str], rng: random.Random, cfg: ArithConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, loss_mask)``: right-padded documents; the mask selects completion targets."""
    prompts = [rng.choice(pool) for _ in range(cfg.pretrain_batch)]
    texts = [p + document_completion(p, rng, cfg) for p in prompts]
    ids = [tokenizer.convert_tokens_to_ids(list(t)) + [tokenizer.eos_token_id] for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    plen = len(prompts[0])
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, plen : len(x)] = True
    return input_ids, mask


def pretrain(cfg: ArithConfig, *, log: Any = None) -> tuple[Any, dict[str, float]]:
    """Supervised pretraining from a random init; returns ``(model, stats)`` (deterministic for a config)."""
    tokenizer = build_tokenizer()
    model = toy.build_model(tokenizer, seed=cfg.seed, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers)
    train_pool, _ = split_problems(cfg)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.pretrain_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    start, loss_ema = time.perf_counter(), float("nan")
    for step in range(cfg.pretrain_steps):
        input_ids, mask = _pretraining_batch(tokenizer, train_pool, rng, cfg)
        logits = model(input_ids=input_ids).logits[:, :-1]
        targets = input_ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        loss_ema = value if step == 0 else 0.98 * loss_ema + 0.02 * value
        if log is not None and (step + 1) % 100 == 0:
            log(f"pretrain step {step + 1}/{cfg.pretrain_steps}: loss {loss_ema:.3f}")
    model.eval()
    return model, {"pretrain_loss": loss_ema, "pretrain_seconds": time.perf_counter() - start}


def cache_dir() -> Path:
    """Where pretrained checkpoints are kept: ``$GRPO_FIX_CACHE`` or ``~/.cache/grpo-fix``."""
    return Path(os.environ.get("GRPO_FIX_CACHE", Path.home() / ".cache" / "grpo-fix"))


def pretrained_policy(cfg: ArithConfig, *, log: Any = None) -> tuple[Any, dict[str, float]]:
    """The pretrained policy of ``cfg`` and its pretraining stats, from the cache or trained now."""
    path = cache_dir() / f"arith-{cfg.key()}.pt"
    tokenizer = build_tokenizer()
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = toy.build_model(tokenizer, seed=cfg.seed, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers)
        model.load_state_dict(saved["state_dict"])
        model.eval()
        return model, dict(saved["stats"])
    model, stats = pretrain(cfg, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "stats": stats, "config": asdict(cfg)}, tmp)
    tmp.replace(path)
    return model, stats


def build_tokenizer() -> Any:
    """The character-level tokenizer of the language (digits, ``+ = ; .``, pad, eos)."""
    return toy.build_tokenizer(CHARS)


def parameter_count(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
