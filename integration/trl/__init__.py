"""TRL adapter: the corrected loss and ClipAwareAdamW in ``trl.GRPOTrainer`` by a one-line swap.

::

    from grpo_fix.integration.trl import GRPOFixConfig, GRPOFixTrainer   # was: from trl import ...

    args = GRPOFixConfig(output_dir="out", loss_type="uniform")          # the default
    trainer = GRPOFixTrainer(model=..., reward_funcs=..., args=args, train_dataset=...)
    trainer.train()

Modules: :mod:`.config` (``GRPOFixConfig``, the loss settings), :mod:`.checks` (what is refused at
construction), :mod:`.schedule` (generation and window schedule, window token counts),
:mod:`.buffer` (generation buffer and its checkpoint), :mod:`.generation` (rewards, prefix-consistent
inputs), :mod:`.linear_forward` (the logits-free loss path and its choice), :mod:`.entropy` (TRL's
entropy mask and bonus), :mod:`.metrics`, :mod:`.optimizer`, :mod:`.trainer` (TRL's hooks).
Tested with TRL 1.16 (:mod:`.version`).
"""

import trl as _trl

from .version import check_trl_version

check_trl_version(_trl.__version__)

from .config import (  # noqa: E402
    LOSS_BACKENDS,
    LOSS_COMPILE_MATH,
    LOSS_KERNELS,
    LOSS_TYPES,
    OPTIMIZERS,
    GRPOFixConfig,
    surrogate_config_from_args,
)
from .schedule import WINDOW_TOKENS_KEY  # noqa: E402
from .trainer import GRPOFixTrainer  # noqa: E402

__all__ = [
    "LOSS_BACKENDS",
    "LOSS_COMPILE_MATH",
    "LOSS_KERNELS",
    "LOSS_TYPES",
    "OPTIMIZERS",
    "WINDOW_TOKENS_KEY",
    "GRPOFixConfig",
    "GRPOFixTrainer",
    "surrogate_config_from_args",
]
