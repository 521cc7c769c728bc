"""Adapters (``grpo_fix.integration``); submodules are imported on demand so the optional extras
stay optional:

- :mod:`grpo_fix.integration.trl`: ``GRPOFixConfig`` / ``GRPOFixTrainer``, a one-line swap for
  TRL 1.16's ``GRPOConfig`` / ``GRPOTrainer`` (extra ``[trl]``).
- :mod:`grpo_fix.integration.deepspeed`: ``clip_aware_deepspeed_config`` and ``attach_deepspeed``
  for ``deepspeed.initialize(optimizer=ClipAwareAdamW(...))`` under ZeRO 0-3 (extra ``[deepspeed]``).

Runnable examples live in ``integration/examples/`` of the source tree.
"""
