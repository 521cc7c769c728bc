"""The TRL versions this adapter is tested with, checked when it is imported.

``GRPOFixTrainer`` overrides TRL internals (``_compute_loss``, ``_prepare_inputs``,
``_generate_and_score_completions``, ``_calculate_rewards``, the checkpoint hooks) and reads its
attributes, so an older TRL is refused and a newer one is accepted with a warning.
"""

from __future__ import annotations

import warnings

#: TRL releases the adapter's tests run on: ``[TESTED_MIN, TESTED_BELOW)``.
TESTED_MIN = "1.16"
TESTED_BELOW = "1.17"


def check_trl_version(version: str) -> None:
    """``ImportError`` below :data:`TESTED_MIN`; a ``UserWarning`` at or above :data:`TESTED_BELOW`."""
    from packaging.version import Version

    found = Version(version)
    if found < Version(TESTED_MIN):
        raise ImportError(
            f"grpo_fix.integration.trl needs trl >= {TESTED_MIN} (it overrides TRL internals; tested with trl "
            f"{TESTED_MIN}.x), found trl {version}: pip install 'trl>={TESTED_MIN},<{TESTED_BELOW}'"
        )
    if found >= Version(TESTED_BELOW):
        warnings.warn(
            f"grpo_fix.integration.trl is tested with trl {TESTED_MIN}.x and overrides TRL internals; found trl "
            f"{version}. If training fails or its metrics look wrong, pin 'trl>={TESTED_MIN},<{TESTED_BELOW}'.",
            UserWarning,
            stacklevel=3,
        )
