"""Adapters (``grpo_fix.integration``); submodules are imported on demand so the optional extras
stay optional:

- :mod:`grpo_fix.integration.trl`: ``GRPOFixConfig`` / ``GRPOFixTrainer``, a one-line swap for
  TRL 1.16's ``GRPOConfig`` / ``GRPOTrainer`` (extra ``[trl]``).
- :mod:`grpo_fix.integration.deepspeed`: ``clip_aware_deepspeed_config`` and ``attach_deepspeed``
  for ``deepspeed.initialize(optimizer=ClipAwareAdamW(...))`` under ZeRO 0-3 (extra ``[deepspeed]``).
- :mod:`grpo_fix.integration.verl`: the policy loss ``loss_mode="grpo_fix"`` (registered through
  the ``verl.plugins`` entry point) and a ``ClipAwareAdamW`` that verl's ``optimizer_impl`` can
  name; importing it needs no verl.

Runnable examples live in ``integration/examples/`` of the source tree.
"""
