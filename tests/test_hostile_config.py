"""Hostile values in ``GRPOFixConfig``'s numeric fields: refused when the config is built, with an
error naming the field, or accepted into a config whose loss and optimizer can be built.  Never
accepted now and refused later (at the first training step, minutes into a run).

Uses the shared hostile values of :mod:`strategies`; a new numeric field is covered by adding its
name to :data:`FIELDS`.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import SPECIAL_FLOATS

pytest.importorskip("trl")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_trl import TRAINER_BASE  # noqa: E402

from grpo_fix import ClipAwareAdamW, GroupSurrogateLoss  # noqa: E402
from grpo_fix.integration.trl import GRPOFixConfig, surrogate_config_from_args  # noqa: E402
from grpo_fix.integration.trl.optimizer import clip_aware_kwargs  # noqa: E402

#: GRPOFixConfig fields whose value reaches the loss or the optimizer (TRL's and ours)
FIELDS = (
    "learning_rate",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "epsilon",
    "epsilon_high",
    "delta",
    "beta",
    "temperature",
    "clip_aware_tau",
    "clip_aware_alpha_init",
    "sapo_temperature_pos",
    "vespo_k_pos",
)
HOSTILE = SPECIAL_FLOATS + (-1.0, 1.5, 2.0, 1e9)


@settings(
    max_examples=int(os.environ.get("GRPO_FIX_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    field=st.sampled_from(FIELDS),
    value=st.sampled_from(HOSTILE),
    loss_type=st.sampled_from(["uniform", "dapo", "grpo", "cispo", "sapo", "vespo"]),
)
def test_hostile_numeric_fields_are_refused_at_construction_or_usable(tmp_path_factory, field, value, loss_type):
    out = tmp_path_factory.mktemp("cfg")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = GRPOFixConfig(
                output_dir=str(out), **{**TRAINER_BASE, "use_cpu": True, "loss_type": loss_type, field: value}
            )
    except (ValueError, TypeError) as e:
        name = field.replace("clip_aware_", "")
        assert field in str(e) or name in str(e) or "eps" in str(e) or "beta" in str(e) or "lr" in str(e), (
            f"{field}={value!r} refused without naming it: {e}"
        )
        return
    # accepted: the loss and the optimizer the trainer would build must build now
    GroupSurrogateLoss(surrogate_config_from_args(args))
    ClipAwareAdamW([torch.nn.Parameter(torch.zeros(2))], weight_decay=args.weight_decay, **clip_aware_kwargs(args))
