"""The embedded toy task (task 1): tokenizer, tiny policy, prompts and verifiable rewards, built in code.

Used by ``grpo-fix demo`` and the experiments; nothing is downloaded.  Importing this module has
no side effect: entry points that want the hub switched off call :func:`offline_environment`.

- Tokenizer: character level over ``a-z 0-9 : ?`` plus ``<pad>`` (id 0) and ``<eos>`` (id 1): a
  ``PreTrainedTokenizerFast`` with left padding and a trivial chat template, as TRL expects.
  :func:`build_tokenizer` takes another alphabet for other tasks (:mod:`grpo_fix.lab.arith`).
- Policy: a randomly initialised Qwen2 (2 layers, hidden 64 by default, ~70k parameters).
- Prompts: short random letter strings such as ``"say:kq"``.
- Rewards (verifiable): :func:`share_of_target`, the share of the completion's characters equal
  to ``"a"`` (a random policy scores about 1/38; learnable in a few dozen GRPO steps), and
  :func:`first_is_target`, 1 when the first character is ``"a"`` (so the completion's length
  cannot matter: the length-bias experiment).  The end-of-sequence token lets completion lengths
  vary, which is what exposes the length-dependent weighting of 1/|o_i| (paper Prop. 1).
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789:?"
TARGET = "a"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def offline_environment() -> None:
    """Set ``HF_HUB_OFFLINE=1`` and ``TOKENIZERS_PARALLELISM=false`` unless already set (entry points
    call it; nothing in the lab needs the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_tokenizer(chars: str = CHARS) -> Any:
    """Character-level ``PreTrainedTokenizerFast`` over ``chars`` (pad id 0, eos id 1, left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(chars)) != len(chars) or any(c.isspace() for c in chars):
        raise ValueError(f"chars must be distinct non-whitespace characters, got {chars!r}")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(pattern="", behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    tokenizer: Any,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` sized for CPU experiments.

    Args:
        tokenizer: gives the vocabulary size and the pad / eos ids.
        seed: initialisation seed (the global RNG is left untouched).
        hidden_size: width (4 query heads, 2 key-value heads).
        num_layers: decoder layers.
        intermediate_size: MLP width (default ``2 * hidden_size``).
        dtype: parameter dtype (default float32).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model: Any = Qwen2ForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model


def build_prompts(n: int, *, seed: int = 0, length: int = 2) -> list[str]:
    """``n`` prompts ``"say:<letters>"`` (deterministic for a seed)."""
    rng = random.Random(seed)
    letters = "bcdefghijklmnopqrstuvwxyz"  # never the target, so the prompt gives no free reward
    return ["say:" + "".join(rng.choice(letters) for _ in range(length)) for _ in range(n)]


def _chars(text: str) -> list[str]:
    return [c for c in text if c in CHARS]


def share_of_target(text: str) -> float:
    """Reward of one completion: share of its characters equal to :data:`TARGET` (0 if empty)."""
    chars = _chars(text)
    return sum(c == TARGET for c in chars) / len(chars) if chars else 0.0


def first_is_target(text: str) -> float:
    """Reward of one completion: 1.0 when its first character is :data:`TARGET`, else 0.0 (the
    length of the completion cannot change it)."""
    chars = _chars(text)
    return float(bool(chars) and chars[0] == TARGET)


def target_share_reward(completions: list[Any], **_: Any) -> list[float]:
    """TRL reward function (plain-text or conversational completions) for the toy task."""
    return [share_of_target(c if isinstance(c, str) else c[-1]["content"]) for c in completions]
