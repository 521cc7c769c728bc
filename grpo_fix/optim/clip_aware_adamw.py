r"""ClipAwareAdamW: an AdamW that keeps a PPO/GRPO policy inside the clipping trust region.

When one rollout batch is optimised for several inner steps, a token whose importance ratio has
left the clip region in its advantage's direction gets a zero advantage gradient (paper Eq. 28),
but AdamW's first moment keeps moving the parameters: after ``T`` steps of a constant gradient
the first clipped step is ``C_T`` times the last unclipped one (Eq. 32), and after ``k`` more
clipped steps ``C_{T,k}`` (Eq. 36), tending to ``(beta1 / sqrt(beta2))^(k+1)`` (Eq. 37).
Clipping stops the gradient, not the trajectory (Prop. 3 / Prop. 7).  The paper leaves the
correction open; the three mechanisms here are grpo-fix's, driven by the
:class:`~grpo_fix.TrustRegionSignal` the loss measures:

1. **gate** (:mod:`grpo_fix.optim.gate`): ``m <- beta1 * kappa * m + (1 - beta1) * g`` with
   ``kappa`` the window's unclipped share of the advantage-gradient mass.  Nothing clipped: AdamW;
   everything clipped: the carried momentum is dropped, the residual step of Prop. 3 is zero.
2. **controller**: a step multiplier ``alpha`` in ``[alpha_min, 1]`` updated once per window at
   :meth:`observe` (:mod:`grpo_fix.optim.controller`: shrink when the overshoot fraction exceeds
   ``tau``, grow back towards 1 otherwise, never below the floor; a controller stuck at the floor
   is reported).  It starts at ``alpha_init``, is carried across rollout boundaries, and scales
   the Adam step (``lr * alpha``), never ``group["lr"]`` (LR schedulers keep working) and never
   the decoupled weight decay (``lr * weight_decay``: a regulariser that follows the LR schedule,
   not how often the policy overshoots).
3. **backtrack** (opt-in, one extra no-grad forward per step): :mod:`grpo_fix.optim.backtrack`.

The trainer calls :meth:`ClipAwareAdamW.observe` once per optimizer window (the window's signal
summed over micro-batches and data-parallel ranks), then ``step()``; the signal stays latched
until the next ``observe`` (DeepSpeed calls ``step()`` once per param group or ZeRO-3
sub-group).  Without ``observe`` the optimizer is ``torch.optim.AdamW``.  The defaults
(``tau = 0.05``, no warm start, alpha carried, momentum not shrunk with alpha) are judged against
tuned AdamW by the fair optimizer protocol: ``benchmarks/results/fair_*.md``.

State: torch's AdamW schema (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so
AdamW checkpoints load and ours load into AdamW; the per-group controller state
(:mod:`grpo_fix.optim.group_state`) rides along.  Between steps ``state[p]["exp_avg"]`` may be
stored scaled: times ``state[p]["ca_m_scale"]`` (a pending momentum shrink, or the fused CPU
kernel's lazy scale) it is the first moment; ``state_dict()`` folds the scale in.

Non-finite input: ``nonfinite="skip"`` (default) skips a ``step()`` with a NaN or infinite
gradient element (:mod:`grpo_fix.optim.finite`), leaving parameters and state untouched and
counting it in :attr:`skipped_steps`; a non-finite signal invalidates its window (its steps are
skipped and counted).  ``"raise"`` raises instead.  Negative masses always raise.
``GradScaler`` unscales and skips overflow steps itself (``_step_supports_amp_scaling`` False).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..kernels.adamw_step import nonfinite_check_
from ..options import Backend, deprecated
from ..signal import TrustRegionSignal
from .backtrack import NonFiniteRemeasure, StepSnapshot, backtrack_step
from .controller import CONTROLLER_SETTINGS, STUCK_WINDOWS, advance_controller, stuck_message
from .finite import all_finite
from .functional import clip_aware_adamw
from .gate import read_window
from .group_state import PendingSkips, check_loaded_group, count_skip, fill_group
from .hyperparameters import DEFAULTS, check_adamw_settings, check_fused_group, check_settings, defaults
from .step_inputs import Collected, all_on_triton, groups_with_grads, on_triton, steps_on_device

__all__ = ["ClipAwareAdamW"]

#: process-local attributes (not pickled): the backtrack callable and the DeepSpeed attachment
_LOCAL_ATTRS: dict[str, Any] = {"_backtrack_fn": None, "_deepspeed": None}
#: ``last_stats`` before the first window
_FRESH_STATS = {"kappa": 1.0, "alpha": 1.0, "overshoot_fraction": 0.0, "backtracks": 0.0, "stuck_windows": 0.0}


class ClipAwareAdamW(torch.optim.AdamW):
    r"""``torch.optim.AdamW`` with the clip-aware gate, trust-region controller and backtrack.

    Algorithm (per optimizer window ``w`` with signal ``kappa_w``, overshoot fraction ``f_w``;
    per step ``t`` within it)::

        at observe(signal_w):   alpha <- next_alpha(alpha, f_w)       (alpha_init before the first)
        at step():              g <- grad (negated if maximize)
                                theta <- theta * (1 - lr * weight_decay)
                                m <- beta1 * kappa_w * m + (1 - beta1) * g
                                v <- beta2 * v + (1 - beta2) * g^2
                                theta <- theta - lr * alpha * m_hat / (sqrt(v_hat) + eps)
                                [backtrack: theta <- theta_before + a * delta, m <- a * m]

    with the bias-corrected ``m_hat``, ``v_hat`` of AdamW (:func:`~grpo_fix.optim.clip_aware_adamw`).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, fused: as
            ``torch.optim.AdamW`` (``capturable=True`` and ``differentiable=True`` are refused).
        gate: scale the carried momentum by the window's ``kappa`` (default True).
        controller: apply the trust-region step multiplier ``alpha`` (default True).
        tau: the overshoot fraction above which ``alpha`` shrinks, and the backtrack's bound
            (default 0.05).
        alpha_init: ``alpha`` before the first observed window, in ``[alpha_min, 1]`` (default
            1.0; 0.1 warm-starts: fewer collapses at a too-high lr, but a cost in reward at a
            well-tuned one in ``benchmarks/results/fair_*.md``).
        alpha_min: the floor of ``alpha``, in (0, 1] (default 1e-3); a window that overshoots
            with alpha at the floor counts in ``last_stats["stuck_windows"]``, and the optimizer
            warns once when 10 windows in a row do.
        backtrack: re-measure after every step with :meth:`set_backtrack_fn`'s callable and pull
            the step back while it overshoots (default False).
        shrink, grow: the controller's factors (default 0.5 and 1.25).
        reset_on_rollout: reset ``alpha`` to 1 on a window that starts a rollout batch (default
            False: alpha is carried across rollouts).
        shrink_momentum: also scale the first moment by ``shrink`` when alpha shrinks (default
            False).
        max_backtracks: the most halvings of one step (default 5).
        nonfinite: ``"skip"`` (default) or ``"raise"`` for a non-finite gradient or signal.
        backend: ``"auto"`` (Triton for CUDA tensors when available, torch otherwise),
            ``"torch"`` or ``"triton"`` (:func:`~grpo_fix.optim.clip_aware_adamw`).
        kernel: deprecated spelling of ``backend``.

    Usage::

        opt = ClipAwareAdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
        for window in windows:
            acc = SignalAccumulator()
            for mb in window:
                out = loss_fn(...); out.loss.backward(); acc.add(out.signal)
            opt.observe(acc.take(all_reduce=True, rollout_start=window.first))
            opt.step(); opt.zero_grad()
    """

    # the clip-aware settings (grpo_fix.optim.hyperparameters), the last window's statistics and
    # the process-local attachments
    gate: bool
    controller: bool
    tau: float
    alpha_init: float
    alpha_min: float
    backtrack: bool
    shrink: float
    grow: float
    reset_on_rollout: bool
    shrink_momentum: bool
    max_backtracks: int
    nonfinite: str
    backend: Backend
    last_stats: dict[str, float]
    _backtrack_fn: Callable[[], TrustRegionSignal] | None
    _deepspeed: dict[str, Any] | None
    _pending_skips: PendingSkips

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        gate: bool = True,
        controller: bool = True,
        tau: float = 0.05,
        alpha_init: float = 1.0,
        alpha_min: float = 1e-3,
        backtrack: bool = False,
        shrink: float = 0.5,
        grow: float = 1.25,
        reset_on_rollout: bool = False,
        shrink_momentum: bool = False,
        max_backtracks: int = 5,
        nonfinite: str = "skip",
        backend: Backend = "auto",
        kernel: str | None = None,
    ) -> None:
        if kernel is not None:
            deprecated(f"ClipAwareAdamW(kernel={kernel!r})", f"backend={kernel!r}")
            backend = kernel  # type: ignore[assignment]
        check_adamw_settings(
            lr,
            betas,
            eps,
            weight_decay,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            backend=backend,
        )
        settings = check_settings({k: v for k, v in locals().items() if k in DEFAULTS})
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=False,
            differentiable=False,
            fused=fused,
        )
        self.__dict__.update(settings)
        self.__dict__.update(copy.deepcopy(_LOCAL_ATTRS))  # _deepspeed: set by attach_deepspeed
        self._pending_skips = PendingSkips()
        # GradScaler must unscale and skip overflow steps itself (we pre-scale exp_avg).
        self._step_supports_amp_scaling = False
        self.last_stats = dict(_FRESH_STATS)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``; the new group joins where the optimizer
        stands: the current alpha, start flag, stuck count and latched window
        (:mod:`grpo_fix.optim.group_state`)."""
        super().add_param_group(param_group)
        group, i = self.param_groups[-1], len(self.param_groups) - 1
        check_fused_group(group, i)
        fill_group(group, like=self.param_groups[0] if i > 0 else None)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups; keep the settings and
        # last_stats too (the process-local attributes are not kept)
        self.state_dict()  # folds the pending skips and momentum scales
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in (*DEFAULTS, "last_stats") if hasattr(self, k)})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        extra = {k: state.pop(k) for k in (*DEFAULTS, "last_stats") if k in state}
        if "kernel" in state:  # pickled by 0.1, which called the backend "kernel"
            extra.setdefault("backend", state.pop("kernel"))
        super().__setstate__(state)
        self.__dict__.update(extra)
        # load_state_dict passes through here too (keep what is set); an older or a plain AdamW
        # pickle lacks settings: their defaults
        for k, v in {**defaults(), **_LOCAL_ATTRS, "last_stats": _FRESH_STATS}.items():
            self.__dict__.setdefault(k, copy.deepcopy(v))
        self._pending_skips = PendingSkips()  # what was pending was folded before saving
        self._step_supports_amp_scaling = False
        for i, group in enumerate(self.param_groups):
            check_loaded_group(group, i, self.alpha_min)

    # ------------------------------------------------------------------------------------------
    # the window's signal
    # ------------------------------------------------------------------------------------------
    def observe(self, signal: TrustRegionSignal, *, all_reduce: bool = False) -> None:
        """Latch the optimizer window's signal; update the controller once for this window.

        ``signal`` must already be summed over the window's micro-batches and, under data
        parallelism, all-reduced over ranks (``signal.all_reduce()``), or pass
        ``all_reduce=True`` to do it here over the group recorded by ``attach_deepspeed`` (the
        world otherwise).  Raises ``TypeError`` for a non-signal and ``ValueError`` for negative
        masses; a non-finite signal raises (``nonfinite="raise"``) or invalidates the window
        (``"skip"``: its steps are skipped, the controller is not updated).
        """
        if all_reduce and isinstance(signal, TrustRegionSignal):
            signal = signal.all_reduce(self._deepspeed.get("process_group") if self._deepspeed else None)
        if self._deepspeed is not None and self._deepspeed.get("loop") is not None:
            self._deepspeed["loop"].observed()  # the DeepSpeed loop checks of attach_deepspeed
        window = read_window(signal, gate=self.gate)
        if not window.finite:
            if self.nonfinite == "raise":
                signal.validate()  # raises ValueError naming the non-finite fields
            warnings.warn(
                f"ClipAwareAdamW: non-finite TrustRegionSignal, skipping this window's steps: {signal.as_dict()}",
                RuntimeWarning,
                stacklevel=2,
            )
            for group in self.param_groups:
                group["ca_invalid"] = True
            return
        kappa, f = window.kappa, window.overshoot_fraction
        shrunk, newly_stuck = False, False
        controller_settings = {k: getattr(self, k) for k in CONTROLLER_SETTINGS}
        for group in self.param_groups:
            group["ca_invalid"], group["ca_kappa"], group["ca_f"] = False, kappa, f
            if self.controller:
                s, st = advance_controller(
                    group, f, informative=window.informative, rollout_start=signal.rollout_start, **controller_settings
                )
                shrunk, newly_stuck = shrunk or s, newly_stuck or st
        if newly_stuck:
            msg = stuck_message(STUCK_WINDOWS, alpha_min=self.alpha_min, tau=self.tau, overshoot_fraction=f)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        if shrunk and self.shrink_momentum:
            # Momentum halving, applied lazily at each tensor's next step.  Walk self.state (keyed
            # by the stepped tensors, also the flat partitions that ZeRO-3 hides from the groups).
            for st in self.state.values():
                if "exp_avg" in st:
                    st["ca_m_scale"] = float(st.get("ca_m_scale", 1.0)) * self.shrink
        self.last_stats = {
            "kappa": kappa,
            "alpha": self.alpha,
            "overshoot_fraction": f,
            "backtracks": 0.0,
            "skipped_steps": float(self.skipped_steps),
            "stuck_windows": float(max((g["ca_stuck"] for g in self.param_groups), default=0)),
        }

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite gradient or signal (``nonfinite="skip"``).

        Counted per param group (``group["ca_skipped"]``, so it is in the state dict and survives a
        resume; under ZeRO each group's ``step()`` call counts for its group) and reported as the
        maximum over groups, i.e. the number of skipped optimizer steps.  Under DeepSpeed
        (:func:`~grpo_fix.integration.deepspeed.attach_deepspeed`) the steps the engine skipped
        itself without calling ``step()`` (an fp16 loss-scale overflow, ZeRO's own overflow check)
        are added: ``engine.skipped_steps``, which DeepSpeed keeps in its checkpoints."""
        self._pending_skips.fold()
        own = int(max((g.get("ca_skipped", 0) for g in self.param_groups), default=0))
        engine = self._deepspeed.get("engine") if self._deepspeed else None
        engine = engine() if engine is not None else None  # a weak reference
        return own + int(getattr(engine, "skipped_steps", 0) or 0)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``, with the skips decided on the device counted and
        every momentum scale folded into ``exp_avg`` (in place), so that the saved moments are
        AdamW's (a run that saves continues exactly like one that resumes)."""
        self._pending_skips.fold()
        for st in self.state.values():
            scale = st.pop("ca_m_scale", 1.0)
            if scale != 1.0:
                st["exp_avg"].mul_(scale)
        return super().state_dict()

    @property
    def alpha(self) -> float:
        """The controller's current step multiplier (1.0 when the controller is off)."""
        return float(self.param_groups[0]["ca_alpha"]) if self.controller and self.param_groups else 1.0

    def set_backtrack_fn(self, fn: Callable[[], TrustRegionSignal] | None) -> None:
        """Install the trainer's re-measure callable (called under ``torch.no_grad()`` after each
        step when ``backtrack=True``): it must re-run the loss on the window's micro-batch with
        the current parameters and return its fresh :class:`TrustRegionSignal`."""
        if fn is not None and not callable(fn):
            raise TypeError("set_backtrack_fn expects a callable returning a TrustRegionSignal")
        if fn is not None and self._deepspeed is not None and self._deepspeed.get("refuse_backtrack"):
            raise RuntimeError(self._deepspeed["refuse_backtrack"])
        self._backtrack_fn = fn

    # ------------------------------------------------------------------------------------------
    # step
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step on every group with gradients, with the latched window's signal
        (skipped and counted when the window is invalid or a gradient is not finite)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        groups = [g for g in self.param_groups if len(g["params"]) > 0]
        if any(g["ca_invalid"] for g in groups):
            count_skip(groups)
            return loss
        collected = groups_with_grads(self.param_groups)
        if not collected:
            return loss
        if self._checks_on_device(collected):
            # Triton everywhere: the kernel reads a device flag, nothing is read on the host
            ok = torch.ones((), dtype=torch.float32, device=collected[0][1][0].device)
            nonfinite_check_([p.grad for _, ps in collected for p in ps if p.grad is not None], ok)
            for group, _ in collected:
                self._step_group(group, ok)
            self._pending_skips.record(groups, ok)
            return loss
        if not all_finite([p.grad for _, ps in collected for p in ps if p.grad is not None]):
            if self.nonfinite == "raise":
                raise FloatingPointError("ClipAwareAdamW: non-finite gradient (nonfinite='raise')")
            count_skip(groups)
            return loss
        if self.backtrack and self._backtrack_fn is not None:
            self._backtracked_step(self._backtrack_fn, collected, groups)
        else:
            for group, _ in collected:
                self._step_group(group)
        return loss

    def _checks_on_device(self, collected: Collected) -> bool:
        """Whether this step decides on the device to skip a non-finite gradient: every group on
        the Triton path on one device, no backtrack, ``nonfinite="skip"``."""
        if self.nonfinite != "skip" or (self.backtrack and self._backtrack_fn is not None):
            return False
        return all_on_triton(self.backend, collected)

    def _backtracked_step(
        self,
        fn: Callable[[], TrustRegionSignal],
        collected: Collected,
        groups: list[dict[str, Any]],
    ) -> None:
        """The step with backtracking, all or nothing (:mod:`grpo_fix.optim.backtrack`)."""
        if self._deepspeed is not None and self._deepspeed.get("refuse_backtrack"):
            raise RuntimeError(self._deepspeed["refuse_backtrack"])
        stepped = [p for _, ps in collected for p in ps]
        snapshot = StepSnapshot(stepped, self.state)
        try:
            for group, _ in collected:
                self._step_group(group)
            stats = backtrack_step(
                fn,
                stepped,
                snapshot.values,
                [self.state[p]["exp_avg"] for p in stepped],
                bound=max(self.tau, max(float(g["ca_f"]) for g, _ in collected)),
                max_backtracks=self.max_backtracks,
            )
        except NonFiniteRemeasure as err:
            snapshot.restore(self.state)
            if self.nonfinite == "raise":
                raise
            warnings.warn(f"{err}; the step is undone and counted as skipped", RuntimeWarning, stacklevel=3)
            count_skip(groups)
            return
        except BaseException:
            snapshot.restore(self.state)
            raise
        self.last_stats = dict(self.last_stats, **stats)

    def _step_group(self, group: dict[str, Any], ok: torch.Tensor | None = None) -> None:
        lists: list[list[torch.Tensor]] = [[] for _ in range(6)]
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = lists
        has_complex = self._init_group(group, *lists)
        if not params:
            return
        if on_triton(self.backend, group, params):
            state_steps = steps_on_device(self.state, params)
        beta1, beta2 = group["betas"]
        stored = clip_aware_adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            max_exp_avg_sqs=max_exp_avg_sqs,
            lr=group["lr"],
            alpha=float(group["ca_alpha"]) if self.controller else 1.0,
            kappa=float(group["ca_kappa"]) if self.gate else 1.0,
            m_scales=[float(self.state[p].pop("ca_m_scale", 1.0)) for p in params],
            beta1=beta1,
            beta2=beta2,
            backend=self.backend,
            has_complex=has_complex,
            ok=ok,
            **{k: group[k] for k in ("eps", "weight_decay", "amsgrad", "maximize", "foreach", "fused")},
        )
        for p, s in zip(params, stored):
            if s != 1.0:  # the fused CPU kernel's lazily scaled first moment
                self.state[p]["ca_m_scale"] = s
