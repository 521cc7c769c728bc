"""Numerical health monitor: find the step and micro-batch where loss, gradients or signal go non-finite.

Opt-in and cheap.  :meth:`HealthMonitor.check` computes, on the tensors' own device, one
non-finite flag per quantity (the loss, each parameter's gradient via one multi-tensor norm, each
:class:`~grpo_fix.TrustRegionSignal` field) and keeps the flags pending; it reads them on the host
(one synchronisation per device) only every ``every`` calls and at :meth:`flush`.  So with
``every > 1`` a healthy run pays a few tiny device kernels per call and no host sync; when the
flags are read, the first non-finite quantity is reported with the ``step`` and ``micro_batch``
the caller passed when it was checked:

- ``mode="raise"`` (default): :class:`FloatingPointError` naming step, micro-batch and quantity
  (``loss``, ``gradient of parameter NAME``, ``signal field FIELD``), plus how many other
  non-finite quantities were pending;
- ``mode="log"``: a warning on the ``grpo_fix.health`` logger per event, and the events appended
  to :attr:`HealthMonitor.events` (dicts with ``step``, ``micro_batch``, ``quantity``).

Because the flags are read late (up to ``every - 1`` calls after the fact), a ``"raise"`` monitor
with ``every > 1`` reports the right step but raises later; combine it with ClipAwareAdamW's
``nonfinite="skip"`` (the default: a non-finite gradient or signal never reaches the parameters
or the optimizer state) so nothing is corrupted meanwhile, or use ``every=1`` to stop at once.

Gradients are checked per element (:func:`grpo_fix.optim.finite.nonfinite_flags`, the check
ClipAwareAdamW uses too): large finite gradients, whose L2 norm would overflow (an fp16 norm
above 65,504, fp32 elements near 1e19), are not reported; sparse gradients are checked through
their stored values.

Transformers / TRL: :class:`HealthMonitorCallback` checks the accumulated gradients after every
micro-batch's backward (``on_substep_end``; gradients accumulate and a non-finite value stays
non-finite, so the first micro-batch flagged is the one that caused it) and before the optimizer
step (``on_pre_optimizer_step``), and the logged ``loss`` / ``grad_norm`` (``on_log``; set
``logging_nan_inf_filter=False`` or transformers replaces a NaN loss by the running mean before
logging).  Under DeepSpeed ZeRO the model's ``.grad`` are not populated (the engine keeps
partitioned gradients): gradient checks then see nothing, loss and signal checks still work.

    monitor = HealthMonitor(mode="raise", every=16)
    for step, window in enumerate(windows):
        for mb, batch in enumerate(window):
            out = loss_fn(...); out.loss.backward()
            monitor.check(step, mb, loss=out.loss, signal=out.signal)
        monitor.check(step, None, parameters=model.named_parameters())
        opt.step(); opt.zero_grad()
    monitor.flush()

    trainer.add_callback(HealthMonitorCallback(HealthMonitor(mode="log", every=8)))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .optim.finite import nonfinite_flags
from .signal import TENSOR_FIELDS, TrustRegionSignal

__all__ = ["HealthMonitor", "HealthMonitorCallback"]

logger = logging.getLogger("grpo_fix.health")


class HealthMonitor:
    """Opt-in non-finite detector for loss, gradients and the trust-region signal (module docstring).

    Args:
        mode: ``"raise"`` (FloatingPointError) or ``"log"`` (warning + :attr:`events`).
        every: read the pending flags on the host every ``every`` calls of :meth:`check`
            (default 16; ``1`` checks at once, one sync per call).
        enabled: ``False`` makes every call a no-op.
    """

    def __init__(self, mode: str = "raise", every: int = 16, *, enabled: bool = True) -> None:
        if mode not in ("raise", "log"):
            raise ValueError(f"mode must be 'raise' or 'log', got {mode!r}")
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.mode = mode
        self.every = int(every)
        self.enabled = bool(enabled)
        self.events: list[dict[str, Any]] = []
        self.calls = 0
        self.syncs = 0  # host reads of the flags (one per device per flush with something pending)
        # (step, micro_batch, host-side bad labels, flags per device, their labels per device)
        self._pending: list[
            tuple[Any, Any, list[str], dict[torch.device, torch.Tensor], dict[torch.device, list[str]]]
        ] = []

    # ------------------------------------------------------------------------------------------
    def check(
        self,
        step: Any,
        micro_batch: Any = None,
        *,
        loss: Any = None,
        signal: TrustRegionSignal | None = None,
        parameters: Any = None,
        grads: Any = None,
        loss_name: str = "loss",
    ) -> None:
        """Record non-finite flags for the given quantities (no host sync unless it is a flush call).

        ``loss``: a tensor (any shape) or a Python number.  ``signal``: a TrustRegionSignal.
        ``parameters``: a module, ``named_parameters()`` pairs, or plain parameters (their
        ``.grad`` is checked; ``None`` grads are skipped).  ``grads``: a mapping name -> tensor or
        a sequence of tensors (named by position).  Pass ``parameters`` or ``grads``, not both.
        ``loss_name`` labels the loss in reports.  A non-finite Python-number loss is already on
        the host, so it is reported at once (with everything pending).
        """
        if not self.enabled:
            return
        if parameters is not None and grads is not None:
            raise ValueError("pass parameters= or grads=, not both")
        host_bad: list[str] = []
        by_dev: dict[torch.device, list[torch.Tensor]] = {}
        labels_by_dev: dict[torch.device, list[str]] = {}

        def add(dev: torch.device, flags: torch.Tensor, labels: list[str]) -> None:
            by_dev.setdefault(dev, []).append(flags.reshape(-1))
            labels_by_dev.setdefault(dev, []).extend(labels)

        if loss is not None:
            if torch.is_tensor(loss):
                t = loss.detach()
                flag = ~torch.isfinite(t).all() if t.numel() else torch.zeros((), dtype=torch.bool, device=t.device)
                add(t.device, flag, [loss_name])
            elif not math.isfinite(float(loss)):
                host_bad.append(loss_name)
        if signal is not None:
            if not isinstance(signal, TrustRegionSignal):
                raise TypeError(f"signal must be a TrustRegionSignal, got {type(signal).__name__}")
            fs = TENSOR_FIELDS
            ts = [getattr(signal, f).detach() for f in fs]
            for dev in dict.fromkeys(t.device for t in ts):
                sel = [(f, t) for f, t in zip(fs, ts) if t.device == dev]
                vals = torch.stack([t.double().reshape(()) for _, t in sel])
                add(dev, ~torch.isfinite(vals), [f"signal field {f}" for f, _ in sel])
        named = _named_grads(parameters, grads)
        for dev, (idx, bad) in nonfinite_flags([g for _, g in named]).items():
            add(dev, bad, [f"gradient of parameter {named[i][0]}" for i in idx])

        flags = {d: torch.cat(fs) for d, fs in by_dev.items()}
        self._pending.append((step, micro_batch, host_bad, flags, labels_by_dev))
        self.calls += 1
        if host_bad or self.calls % self.every == 0:
            self.flush()

    # ------------------------------------------------------------------------------------------
    def flush(self) -> list[dict[str, Any]]:
        """Read every pending flag (one host sync per device) and report; returns the new events."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        per_dev: dict[torch.device, list[torch.Tensor]] = {}
        for _, _, _, flags, _ in pending:
            for d, f in flags.items():
                per_dev.setdefault(d, []).append(f)
        host: dict[torch.device, list[bool]] = {}
        for d, fs in per_dev.items():
            host[d] = torch.cat(fs).cpu().tolist()  # the one sync per device
            self.syncs += 1
        pos = {d: 0 for d in per_dev}
        new: list[dict[str, Any]] = []
        for step, mb, host_bad, flags, labels in pending:
            bad = list(host_bad)
            for d, f in flags.items():
                vals = host[d][pos[d] : pos[d] + f.numel()]
                pos[d] += f.numel()
                bad.extend(lbl for lbl, v in zip(labels[d], vals) if v)
            new.extend({"step": step, "micro_batch": mb, "quantity": q} for q in bad)
        if not new:
            return []
        if self.mode == "raise":
            e = new[0]
            more = f" ({len(new) - 1} more non-finite quantities pending)" if len(new) > 1 else ""
            raise FloatingPointError(
                f"non-finite {e['quantity']} at step {e['step']}, micro-batch {e['micro_batch']}{more}"
            )
        for e in new:
            logger.warning("non-finite %s at step %s, micro-batch %s", e["quantity"], e["step"], e["micro_batch"])
        self.events.extend(new)
        return new


def _named_grads(parameters: Any, grads: Any) -> list[tuple[str, torch.Tensor]]:
    if grads is not None:
        if isinstance(grads, Mapping):
            items = list(grads.items())
        elif torch.is_tensor(grads):
            items = [("0", grads)]
        else:
            items = [(str(i), g) for i, g in enumerate(grads)]
        return [(str(n), g) for n, g in items if g is not None]
    if parameters is None:
        return []
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.named_parameters()
    elif torch.is_tensor(parameters):
        parameters = [parameters]
    out = []
    for i, item in enumerate(parameters):
        n, p = item if isinstance(item, tuple) else (str(i), item)
        if p.grad is not None:
            out.append((n, p.grad))
    return out


if TYPE_CHECKING:
    from transformers import TrainerCallback as _CallbackBase
else:

    def _callback_base() -> type:
        try:
            from transformers import TrainerCallback
        except ImportError:  # pragma: no cover - transformers is optional
            return object
        return TrainerCallback

    _CallbackBase = _callback_base()


class HealthMonitorCallback(_CallbackBase):
    """A ``transformers.TrainerCallback`` feeding a :class:`HealthMonitor` (module docstring).

    Steps are reported 1-based, as transformers logs them (the optimizer step being taken);
    micro-batches are 0-based within the step's gradient-accumulation window (``None`` for the
    logged loss, which averages the logging interval).  Flushes at ``on_train_end``.
    """

    def __init__(self, monitor: HealthMonitor, *, check_micro_batches: bool = True) -> None:
        self.monitor = monitor
        self.check_micro_batches = bool(check_micro_batches)
        self._micro = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self._micro = 0
        return control

    def on_substep_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.check_micro_batches and model is not None:
            self.monitor.check(state.global_step + 1, self._micro, parameters=model)
        self._micro += 1
        return control

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if model is not None:
            self.monitor.check(state.global_step + 1, self._micro, parameters=model)
        self._micro = 0
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        for key in ("loss", "grad_norm"):
            v = (logs or {}).get(key)
            if isinstance(v, (int, float)) and not math.isfinite(float(v)):
                self.monitor.check(state.global_step, None, loss=float(v), loss_name=f"logged {key}")
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.monitor.flush()
        return control
