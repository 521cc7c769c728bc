"""The tasks the GRPO loop trains on: what a policy is, which prompts a rollout uses, how completions
are scored, and (task 2) the held-out evaluation.

- ``toy`` (task 1, :mod:`grpo_fix.lab.toy`): a random-init 70k-parameter Qwen2, 8 fixed prompts
  per seed, reward = share of ``a`` in the completion.
- ``toy_first``: the same policy and prompts, reward = 1 when the first character is ``a``: the
  completion's length cannot change the reward (the length-bias experiment).
- ``arith`` (task 2, :mod:`grpo_fix.lab.arith`): the pretrained 0.59 M-parameter Qwen2, fresh
  prompts from the training pool at every rollout, reward = answer correct, greedy accuracy on the
  500 held-out problems at the end of a run.

:func:`get_task` builds a task once per process (the pretrained checkpoint is loaded once and
copied for every run).  ``options`` change a task's size (tests use a tiny ``arith``).
"""

from __future__ import annotations

import copy
import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import arith, toy

TASKS = ("toy", "toy_first", "arith")
#: Rollouts and the held-out evaluation sample at temperature 1 from the full distribution (no top-k
#: or top-p truncation); the evaluation with a fixed seed.
EVAL_SEED = 77_777
SAMPLING: dict[str, Any] = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}


@dataclass(frozen=True)
class Completions:
    """A batch of sampled completions: ``input_ids`` / ``attention`` (prompt + completion),
    ``prompt_len``, ``completion`` ids ``(B, L)``, the valid-token ``mask`` (up to and including
    the first ``<eos>``) and the decoded ``texts``."""

    input_ids: torch.Tensor
    attention: torch.Tensor
    prompt_len: int
    completion: torch.Tensor
    mask: torch.Tensor
    texts: list[str]


@dataclass
class Task:
    """One task of the loop (module docstring).

    Attributes:
        name: the key in :data:`TASKS`.
        tokenizer: character-level tokenizer (left padding; pad id 0, eos id 1).
        completion_len: most completion tokens a rollout samples.
        make_policy: ``seed -> model``, a fresh policy (random init or a copy of the checkpoint).
        make_prompts: ``(seed, rollout, n) -> prompts`` of one rollout.
        score: ``(prompt, completion text) -> reward``.
        binary: rewards are 0/1 (correct or not), so lengths can be split by correctness.
        held_out: evaluation prompts never trained on (None: no held-out evaluation).
        info: what the results should record about the task (sizes, pretraining).
    """

    name: str
    tokenizer: Any
    completion_len: int
    make_policy: Callable[[int], Any]
    make_prompts: Callable[[int, int, int], list[str]]
    score: Callable[[str, str], float]
    binary: bool
    held_out: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def rewards(self, prompts: list[str], texts: list[str]) -> torch.Tensor:
        """Float64 rewards of decoded completions (one prompt per completion)."""
        return torch.tensor([self.score(p, t) for p, t in zip(prompts, texts)], dtype=torch.float64)

    @torch.no_grad()
    def generate(self, model: Any, prompts: list[str], *, sample: bool) -> Completions:
        """Complete ``prompts`` (temperature 1 sampling without truncation, or greedy) up to
        :attr:`completion_len` tokens; seed torch's RNG before calling for reproducible samples."""
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            **(SAMPLING if sample else {"do_sample": False}),
            max_new_tokens=self.completion_len,
            min_new_tokens=1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        prompt_len = enc["input_ids"].shape[1]
        completion = out[:, prompt_len:]
        if completion.shape[1] < self.completion_len:  # every row stopped early
            pad = completion.new_full(
                (completion.shape[0], self.completion_len - completion.shape[1]), tok.pad_token_id
            )
            completion = torch.cat([completion, pad], 1)
        is_eos = completion == tok.eos_token_id
        first_eos = torch.where(
            is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], self.completion_len, dtype=torch.long)
        )
        mask = torch.arange(self.completion_len)[None, :] <= first_eos[:, None]  # includes the EOS, as TRL
        texts = tok.batch_decode(completion.masked_fill(~mask, tok.pad_token_id), skip_special_tokens=True)
        texts = ["".join(t.split()) for t in texts]  # the decoder joins characters with spaces
        input_ids = torch.cat([enc["input_ids"], completion], 1)
        attention = torch.cat([enc["attention_mask"], mask.long()], 1)
        return Completions(input_ids, attention, prompt_len, completion, mask, texts)

    def evaluate(self, model: Any, *, samples: int = 2, chunk: int = 500) -> float | None:
        """Held-out accuracy: mean reward of ``samples`` temperature-1 completions of every
        :attr:`held_out` prompt, sampled with a fixed seed (the global RNG is left untouched);
        None when the task has no held-out prompts."""
        if self.held_out is None:
            return None
        model.eval()
        prompts = [p for p in self.held_out for _ in range(samples)]
        scores: list[float] = []
        with torch.random.fork_rng():
            torch.manual_seed(EVAL_SEED)
            for i in range(0, len(prompts), chunk):
                part = prompts[i : i + chunk]
                scores += self.rewards(part, self.generate(model, part, sample=True).texts).tolist()
        return sum(scores) / len(scores)


def _toy(reward: Callable[[str], float], name: str, hidden_size: int = 64, num_layers: int = 2) -> Task:
    tokenizer = toy.build_tokenizer()
    return Task(
        name=name,
        tokenizer=tokenizer,
        completion_len=12,
        make_policy=lambda seed: toy.build_model(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=num_layers),
        make_prompts=lambda seed, rollout, n: toy.build_prompts(n, seed=seed),
        score=lambda prompt, text: reward(text),
        binary=name == "toy_first",
        info={"hidden_size": hidden_size, "num_layers": num_layers},
    )


def _arith(**options: Any) -> Task:
    cfg = arith.ArithConfig(**options)
    checkpoint, stats = arith.pretrained_policy(cfg, log=print)
    train_pool, held_out = arith.split_problems(cfg)

    def prompts(seed: int, rollout: int, n: int) -> list[str]:
        return random.Random(seed * 100_003 + rollout).sample(train_pool, n)

    task = Task(
        name="arith",
        tokenizer=arith.build_tokenizer(),
        completion_len=cfg.completion_len + 1,  # room for one token more than any document
        make_policy=lambda seed: copy.deepcopy(checkpoint),
        make_prompts=prompts,
        score=arith.answer_reward,
        binary=True,
        held_out=held_out,
        info={
            "config": vars(cfg),
            "parameters": arith.parameter_count(checkpoint),
            "train_problems": len(train_pool),
            **stats,
        },
    )
    task.info["held_out_accuracy_start"] = task.evaluate(checkpoint)
    return task


@functools.lru_cache(maxsize=8)
def _cached(name: str, options_json: str) -> Task:
    options = json.loads(options_json)
    if name == "toy":
        return _toy(toy.share_of_target, name, **options)
    if name == "toy_first":
        return _toy(toy.first_is_target, name, **options)
    if name == "arith":
        return _arith(**options)
    raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")


def get_task(name: str, options: dict[str, Any] | None = None) -> Task:
    """The task ``name`` (one of :data:`TASKS`) with size ``options``, built once per process."""
    return _cached(name, json.dumps(options or {}, sort_keys=True))
