"""DeepSpeed integration for :class:`grpo_fix.ClipAwareAdamW` (checked on DeepSpeed 0.19.8).

Usage::

    from grpo_fix import ClipAwareAdamW
    from grpo_fix.integration.deepspeed import attach_deepspeed, clip_aware_deepspeed_config

    opt = ClipAwareAdamW(model.parameters(), lr=1e-6)
    cfg = clip_aware_deepspeed_config(ds_config)          # validates / completes the config
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    attach_deepspeed(opt, engine)                          # checks nobody swapped the optimizer
    signals = SignalAccumulator()
    for micro_batches in windows:                          # gradient accumulation
        for mb in micro_batches:
            out = loss_fn(..., window=Window(tokens=n_window_tokens, dp_size=world))
            signals.add(out.signal)
            if mb is micro_batches[-1]:                    # before the step that ends the window
                opt.observe(signals.take(all_reduce=True))
            engine.backward(out.loss, scale_wrt_gas=False)  # the loss is already window-normalised
            engine.step()                                   # steps the optimizer at the boundary

What the optimizer relies on: under ZeRO-1/2 ``step()`` runs
once per param group on one flat fp32 partition, under ZeRO-3 once per sub-group with the other
groups' ``params`` emptied, with bf16/fp16 and no ZeRO once more during ``deepspeed.initialize``
(zero gradients).  ClipAwareAdamW is elementwise with per-group scalars latched at ``observe``,
so all of these give the non-distributed result, provided every rank observes the same signal:
all-reduce it once per window over the data-parallel group (``signal.all_reduce(group)``),
outside ``step()``.  Backtracking needs the stepped tensors to be the model's parameters, which
holds only without ZeRO in fp32; :func:`attach_deepspeed` refuses it otherwise.

Universal checkpoints (``checkpoint.load_universal``) at ZeRO-3: call :func:`attach_deepspeed`
before ``engine.load_checkpoint``; it repairs two bugs of DeepSpeed 0.19.8's loader that made the
resumed run diverge (see :func:`_repair_zero3_universal_loads`).

:func:`attach_deepspeed` also installs :class:`LoopChecks` on the engine: the two loop mistakes the
example above avoids (a second accumulation scaling, a signal observed after the step) raise.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

__all__ = ["LoopChecks", "attach_deepspeed", "check_deepspeed_config", "clip_aware_deepspeed_config", "offload_device"]


def offload_device(config: dict) -> str:
    """The ``zero_optimization.offload_optimizer.device`` of a DeepSpeed config (``"none"`` if absent)."""
    off = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    device = off.get("device", "none") if isinstance(off, dict) else "none"
    return str(device or "none").lower()


def check_deepspeed_config(config: dict, *, completed: bool = False) -> None:
    """Refuse a DeepSpeed config under which ClipAwareAdamW would not be the optimizer that steps
    (the one validator; every message names the fix):

    - an ``"optimizer"`` block: DeepSpeed, transformers and accelerate build their own optimizer
      and ours is silently dropped;
    - a partial offload (``offload_optimizer.ratio < 1``): only DeepSpeedCPUAdam supports it;
    - with ``completed=True`` (a config the caller cannot complete, e.g. one transformers reads),
      an offload without ``"zero_force_ds_cpu_optimizer": false``: accelerate swaps in
      DeepSpeedCPUAdam, keeping only lr and weight decay.  :func:`clip_aware_deepspeed_config`
      completes a config instead.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (a parsed DeepSpeed JSON config), got {type(config).__name__}")
    if "optimizer" in config:
        block = config["optimizer"]
        kind = block.get("type", "?") if isinstance(block, dict) else block
        raise ValueError(
            f'the DeepSpeed config has an "optimizer" block ({kind!r}): DeepSpeed, transformers and accelerate '
            "would build that optimizer and silently drop ClipAwareAdamW. Remove the 'optimizer' block (remove it "
            "and pass the optimizer instance: deepspeed.initialize(optimizer=ClipAwareAdamW(...)); GRPOFixTrainer "
            'builds it itself); a "scheduler" block may stay'
        )
    device = offload_device(config)
    if device == "none":
        return
    off = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    ratio = float(off.get("ratio", 1.0))
    if ratio < 1.0:
        raise ValueError(
            f"zero_optimization.offload_optimizer.ratio={ratio} (partial offload) only works with "
            "DeepSpeedCPUAdam (DeepSpeed asserts the optimizer type); set ratio to 1.0 (full offload) "
            "or remove offload_optimizer"
        )
    if completed and config.get("zero_force_ds_cpu_optimizer", True) is not False:
        raise ValueError(
            f'zero_optimization.offload_optimizer.device={device!r} without "zero_force_ds_cpu_optimizer": false: '
            "accelerate would replace ClipAwareAdamW with DeepSpeedCPUAdam (keeping only lr and weight_decay). "
            'Add "zero_force_ds_cpu_optimizer": false to the DeepSpeed config (clip_aware_deepspeed_config does '
            "it), or set offload_optimizer.device to 'none'"
        )


def clip_aware_deepspeed_config(config: dict, *, offload: bool | None = None) -> dict:
    """Return a copy of a DeepSpeed config completed for a client :class:`ClipAwareAdamW`.

    - refuses what :func:`check_deepspeed_config` refuses;
    - sets ``zero_allow_untested_optimizer: true`` (a subclass of AdamW fails DeepSpeed's exact
      type check under every ZeRO stage);
    - with optimizer offload sets ``zero_force_ds_cpu_optimizer: false`` (otherwise DeepSpeed
      raises, and accelerate silently replaces the optimizer with ``DeepSpeedCPUAdam``);
    - ``offload=True`` adds ``offload_optimizer: {"device": "cpu"}`` (needs ZeRO stage >= 1),
      ``offload=False`` refuses a config that offloads, ``None`` keeps what the config says.
    """
    check_deepspeed_config(config)
    cfg = copy.deepcopy(config)
    zero = cfg.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0)
    device = offload_device(cfg)
    if offload is True and device == "none":
        if stage < 1:
            raise ValueError("offload=True needs ZeRO stage >= 1: set zero_optimization.stage to 1, 2 or 3")
        off = zero.get("offload_optimizer") or {}
        cfg.setdefault("zero_optimization", {})["offload_optimizer"] = {**off, "device": "cpu"}
        device = "cpu"
    elif offload is False and device != "none":
        raise ValueError(
            f'offload=False but zero_optimization.offload_optimizer.device is {device!r}: set it to "none" '
            "or call with offload=None/True"
        )
    if device != "none":
        cfg["zero_force_ds_cpu_optimizer"] = False
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def attach_deepspeed(optimizer: Any, engine: Any) -> Any:
    """Check that ``engine`` steps ``optimizer`` and tell the optimizer about the engine.

    Asserts ``engine.basic_optimizer is optimizer``: transformers' Trainer (and TRL) drop an
    optimizer *instance* under DeepSpeed and build a stock AdamW, and accelerate replaces it with
    DeepSpeedCPUAdam under ZeRO-Offload unless ``"zero_force_ds_cpu_optimizer": false``.
    Records the ZeRO stage, the data-parallel process group (used by
    ``optimizer.observe(signal, all_reduce=True)``) and whether backtracking is possible (only
    stage 0 in fp32, where the stepped tensors are the model's parameters); raises ``ValueError``
    if ``backtrack=True`` cannot work.  Records the engine too (a weak reference): a step the
    engine skips itself, without calling ``optimizer.step()`` (an fp16 loss-scale overflow, or
    ZeRO's own overflow check of a non-finite gradient), is counted in
    ``optimizer.skipped_steps`` through ``engine.skipped_steps``.  Returns the optimizer.
    """
    from grpo_fix import ClipAwareAdamW

    if not isinstance(optimizer, ClipAwareAdamW):
        raise TypeError(f"attach_deepspeed expects a ClipAwareAdamW, got {type(optimizer).__name__}")
    basic: object = getattr(engine, "basic_optimizer", None)
    if basic is not optimizer:
        raise RuntimeError(
            f"the DeepSpeed engine does not step this ClipAwareAdamW (engine.basic_optimizer is "
            f"{type(basic).__name__}). Known causes: transformers' Trainer / TRL discard an optimizer "
            "instance under DeepSpeed (use trainer.optimizer_cls_and_kwargs = (ClipAwareAdamW, kwargs) or "
            "override create_optimizer()); accelerate swaps in DeepSpeedCPUAdam under ZeRO-Offload unless "
            'the config sets "zero_force_ds_cpu_optimizer": false (see clip_aware_deepspeed_config); an '
            '"optimizer" block in the DeepSpeed config makes DeepSpeed build its own'
        )
    stage = int(engine.zero_optimization_stage())
    low_precision = bool(engine.bfloat16_enabled() or engine.fp16_enabled())
    group = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
    refuse = None
    if stage > 0 or low_precision:
        refuse = (
            f"ClipAwareAdamW(backtrack=True) is not supported under DeepSpeed with ZeRO stage {stage}"
            f"{' and bf16/fp16' if low_precision else ''}: the optimizer steps fp32 master "
            "partitions and DeepSpeed copies them into the model's parameters only after step(), so the "
            "re-measured ratios would not see the pulled-back step. Use backtrack=False (gate + "
            "controller) or ZeRO stage 0 in fp32"
        )
    try:
        engine_ref: Any = weakref.ref(engine)
    except TypeError:  # an engine stand-in without weak-reference support
        engine_ref = lambda: engine  # noqa: E731
    optimizer._deepspeed = {
        "engine": engine_ref,  # read by optimizer.skipped_steps (the steps the engine skipped itself)
        "stage": stage,
        "process_group": group,
        "low_precision": low_precision,
        "offload": bool(getattr(engine, "zero_cpu_offload", lambda: False)()),
        "refuse_backtrack": refuse,
    }
    if refuse and optimizer.backtrack:
        raise ValueError(refuse)
    zero3 = getattr(engine, "optimizer", None)
    if stage == 3 and hasattr(zero3, _ZERO3_UNIVERSAL_LOADER):
        _repair_zero3_universal_loads(zero3, optimizer)
    if all(callable(getattr(engine, name, None)) for name in ("backward", "step", "gradient_accumulation_steps")):
        optimizer._deepspeed["loop"] = LoopChecks.install(engine)
    return optimizer


class LoopChecks:
    """Two mistakes of a hand-written DeepSpeed loop that would otherwise train silently wrong,
    caught on the engine's ``backward`` and ``step`` (installed by :func:`attach_deepspeed`).

    1. **Double accumulation scaling.**  A grpo-fix loss normalised over its optimizer window
       (``Window(tokens=...)`` etc.; :data:`grpo_fix.loss.surrogate.WINDOW_NORMALISED`) is already
       scaled for gradient accumulation; ``engine.backward(loss)`` divides it by
       ``gradient_accumulation_steps`` again.  Refused (``ValueError``) when the accumulation
       steps exceed 1: call ``engine.backward(loss, scale_wrt_gas=False)``.  The mark is an
       attribute of the loss tensor the loss function returns; a tensor computed from it
       (``out.loss + aux``) no longer carries it and is not checked.
    2. **A stale signal.**  ``opt.observe(signal)`` must come after the window's micro-batches (at
       the latest before its last ``engine.step()``).  Called after ``engine.step()`` instead, it
       is read by the *next* window's step.  Once ``observe`` has been used, a window whose
       optimizer step comes with no ``observe`` after at least ``gradient_accumulation_steps - 1``
       of its backward passes raises ``RuntimeError``.  With one micro-batch per window the two
       orders look the same and nothing is checked.

    Transformers' Trainer (and so TRL and ``GRPOFixTrainer``) passes ``scale_wrt_gas=False`` and
    observes inside the loss call, so both checks hold there by construction.
    """

    def __init__(self, engine: Any) -> None:
        from grpo_fix.loss.surrogate import WINDOW_NORMALISED

        self.normalised_attr = WINDOW_NORMALISED  # looked up once, not on every backward
        self.accumulation = int(engine.gradient_accumulation_steps())
        self.backwards = 0  # backward passes of the current window
        self.observed_after: int | None = None  # self.backwards at this window's last observe()
        self.observing = False  # observe() has been called at least once

    @classmethod
    def install(cls, engine: Any) -> LoopChecks:
        """The checks of ``engine``, wrapping its ``backward`` and ``step`` once."""
        existing = getattr(engine, "_grpo_fix_loop_checks", None)
        if isinstance(existing, cls):
            return existing
        checks = cls(engine)
        backward, step = engine.backward, engine.step

        def checked_backward(loss: Any, *args: Any, **kwargs: Any) -> Any:
            scale = kwargs.get("scale_wrt_gas", args[1] if len(args) > 1 else True)
            checks.before_backward(loss, bool(scale))
            return backward(loss, *args, **kwargs)

        def checked_step(*args: Any, **kwargs: Any) -> Any:
            checks.before_step(bool(engine.is_gradient_accumulation_boundary()))
            return step(*args, **kwargs)

        engine.backward, engine.step = checked_backward, checked_step
        engine._grpo_fix_loop_checks = checks
        return checks

    def before_backward(self, loss: Any, scale_wrt_gas: bool) -> None:
        if scale_wrt_gas and self.accumulation > 1 and getattr(loss, self.normalised_attr, False):
            raise ValueError(
                f"engine.backward(loss) would divide this grpo-fix loss by gradient_accumulation_steps="
                f"{self.accumulation} a second time: the loss is already normalised over its optimizer window "
                "(grpo_fix.Window). Call engine.backward(loss, scale_wrt_gas=False)"
            )
        self.backwards += 1

    def observed(self) -> None:
        """Called by :meth:`grpo_fix.ClipAwareAdamW.observe`."""
        self.observed_after, self.observing = self.backwards, True

    def before_step(self, boundary: bool) -> None:
        if not boundary:
            return
        after, self.observed_after, done = self.observed_after, None, self.backwards
        self.backwards = 0
        if self.observing and self.accumulation > 1 and (after is None or after < self.accumulation - 1):
            when = "not at all" if after is None else f"after {after} of its {done} backward passes"
            raise RuntimeError(
                f"ClipAwareAdamW would step this window on a stale trust-region signal: observe() was called "
                f"{when} in this window, so the signal it holds is the previous window's (observe() after "
                "engine.step()?). Call opt.observe(signal) after the window's backward passes, or before its "
                "last one, and before the engine.step() that ends the window"
            )


#: The method of DeepSpeed's ZeRO-3 optimizer that loads a universal checkpoint's optimizer state.
_ZERO3_UNIVERSAL_LOADER = "load_hp_checkpoint_state_from_checkpoint_dir_stage3"


def _repair_zero3_universal_loads(zero3: Any, optimizer: Any) -> None:
    """Make ZeRO-3 universal-checkpoint loads restore ``optimizer`` exactly.

    DeepSpeed 0.19.8's loader (``stage3.py``, ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``,
    called by ``engine.load_checkpoint`` with ``checkpoint.load_universal``) has two bugs:

    - it stores ONE ``step`` tensor object as the state of every fp32 sub-group partition, and
      torch's Adam increments ``state["step"]`` in place, so after the load every engine step
      advances it once per sub-group: Adam's bias correction runs ahead (2 groups: 2 -> 4 -> 6);
    - it copies the saved FIRST param group's hyperparameters into every group (a no-decay group
      comes back with the first group's ``weight_decay``; also our per-group controller state).

    The loader is wrapped on the ZeRO-3 optimizer ``zero3``: after it ran, every partition gets
    its own ``step`` tensor and each saved group's hyperparameters are re-applied from the
    checkpoint's ``zero/optimizer_state.pt``.  Both are idempotent, so a DeepSpeed that fixes the
    bugs is left unchanged.
    """
    import os

    import torch

    original = getattr(zero3, _ZERO3_UNIVERSAL_LOADER)

    def load(checkpoint_dir: str, *args: Any, **kwargs: Any) -> Any:
        out = original(checkpoint_dir, *args, **kwargs)
        for flat in zero3.fp32_partitioned_groups_flat:
            state = optimizer.state.get(flat, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        path = os.path.join(checkpoint_dir, "zero", "optimizer_state.pt")
        saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]["param_groups"]
        if len(saved) != len(optimizer.param_groups):
            raise RuntimeError(f"{path} has {len(saved)} param groups, the optimizer {len(optimizer.param_groups)}")
        for group, saved_group in zip(optimizer.param_groups, saved):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        return out

    setattr(zero3, _ZERO3_UNIVERSAL_LOADER, load)
