"""An embedded toy task with a verifiable reward: tokenizer, tiny policy and prompts built in code.

Used by ``grpo-fix demo`` and the experiments; nothing is downloaded (``HF_HUB_OFFLINE=1`` works).

- Tokenizer: character level over ``a-z 0-9 : ?`` plus ``<pad>`` and ``<eos>`` (a
  ``PreTrainedTokenizerFast`` with left padding and a trivial chat template, as TRL expects).
- Policy: a randomly initialised Qwen2 (2 layers, hidden 64 by default, ~70k parameters).
- Prompts: short random letter strings such as ``"say:kq"``.
- Reward (verifiable): the share of the completion's characters that equal the target character
  ``"a"``; an empty completion scores 0.  A random policy scores about 1/38, and the task is
  learnable in a few dozen GRPO steps, so reward curves separate optimizers quickly.  The
  end-of-sequence token lets completion lengths vary, which is what exposes the length-dependent
  prefix bias of 1/|o_i| weighting (paper Prop. 1).
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789:?"
TARGET = "a"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def build_tokenizer():
    """Character-level ``PreTrainedTokenizerFast`` (pad id 0, eos id 1, left padding)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(pattern="", behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, dtype=None):
    """A randomly initialised Qwen2ForCausalLM sized for CPU experiments."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
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
        model = Qwen2ForCausalLM(cfg)
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


def share_of_target(text: str) -> float:
    """Reward of one completion: share of its characters equal to :data:`TARGET` (0 if empty)."""
    chars = [c for c in text if c in CHARS]
    return sum(c == TARGET for c in chars) / len(chars) if chars else 0.0


def target_share_reward(completions, **_) -> list[float]:
    """TRL reward function (plain-text completions) for the toy task."""
    return [share_of_target(c if isinstance(c, str) else c[-1]["content"]) for c in completions]
