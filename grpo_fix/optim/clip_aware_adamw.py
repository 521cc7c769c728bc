r"""ClipAwareAdamW: an AdamW that keeps a PPO/GRPO policy inside the clipping trust region.

When one rollout batch is optimised for several inner steps, a token whose importance ratio has
left the clip region in its advantage's direction gets a zero advantage gradient (paper Eq. 28),
but AdamW's first moment keeps moving the parameters: after ``T`` steps of a constant gradient
the first clipped step is ``C_T`` times the last unclipped one (Eq. 32), and after ``k`` more
clipped steps ``C_{T,k}`` (Eq. 36), tending to ``(beta1 / sqrt(beta2))^(k+1)`` (Eq. 37).
Clipping stops the gradient, not the trajectory (Prop. 3 / Prop. 7).  The paper leaves the
correction open; the three mechanisms here are grpo-fix's, driven by the
:class:`~grpo_fix.TrustRegionSignal` the loss measures:

1. **gate**: ``m <- beta1 * kappa * m + (1 - beta1) * g`` with ``kappa`` the window's unclipped
   share of the advantage-gradient mass.  Nothing clipped: AdamW.  Everything clipped: the carried
   momentum is dropped, so the residual step of Prop. 3 is zero.  A window with tokens but no
   advantage mass (every advantage 0) gets ``kappa = 0`` (its gradient is zero, so a step would be
   carried momentum alone); a window with no tokens (``TrustRegionSignal.zeros()``) keeps
   ``kappa = 1``.  ``v`` is untouched.
2. **controller**: a step multiplier ``alpha`` updated once per window at :meth:`observe` by
   :func:`~grpo_fix.optim.controller.next_alpha` (shrink when the overshoot fraction exceeds
   ``tau``, grow back towards 1 otherwise).  It starts at ``alpha_init`` (a warm start below 1
   for runs that replay rollouts), is carried across rollout boundaries, and scales the Adam
   step (``lr * alpha``), never ``group["lr"]`` (LR schedulers keep working) and never the
   decoupled weight decay (which stays ``lr * weight_decay``: a regulariser that follows the LR
   schedule, not how often the policy overshoots).
3. **backtrack** (opt-in, one extra no-grad forward per step): :mod:`grpo_fix.optim.backtrack`.

The trainer calls :meth:`ClipAwareAdamW.observe` once per optimizer window with the window's
signal summed over micro-batches and all-reduced over data-parallel ranks, then ``step()``; the
signal stays latched for every ``step()`` call until the next ``observe`` (DeepSpeed calls
``step()`` once per param group or ZeRO-3 sub-group).  Without ``observe`` the optimizer is
``torch.optim.AdamW``.  The defaults (``tau = 0.05``, no warm start, alpha carried, momentum not
shrunk with alpha) were chosen on the toy task: ``benchmarks/results/overshoot_*.md``.

State: torch's AdamW state schema (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``),
so plain AdamW checkpoints load and ours load into AdamW.  Per group: ``ca_alpha`` (the
controller), ``ca_started`` (the warm-start flag), ``ca_kappa`` / ``ca_f`` / ``ca_invalid`` (the
latched window) and ``ca_skipped`` (skipped steps); per tensor a pending momentum shrink
``ca_m_scale`` (``shrink_momentum=True``).  All are in the state dict.

Non-finite input: ``nonfinite="skip"`` (default) skips a ``step()`` whose gradients are not all
finite, leaving parameters and state untouched and counting it in :attr:`skipped_steps`; a
non-finite signal invalidates its window (every step of it is skipped and counted).
``"raise"`` raises instead.  Negative masses always raise.  ``GradScaler`` unscales and skips
overflow steps itself (``_step_supports_amp_scaling`` is False).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..options import Backend, deprecated
from ..signal import TrustRegionSignal
from .backtrack import backtrack_step
from .controller import next_alpha
from .functional import clip_aware_adamw
from .group_state import fill_group
from .hyperparameters import DEFAULTS, check_settings, defaults

__all__ = ["ClipAwareAdamW"]

#: process-local attributes (not pickled): the backtrack callable and the DeepSpeed attachment
_LOCAL_ATTRS: dict[str, Any] = {"_backtrack_fn": None, "_deepspeed": None}


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
        alpha_init: ``alpha`` before the first observed window, in (0, 1] (default 1.0; 0.1
            warm-starts, for runs that give every rollout batch several optimizer steps).
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
        if capturable:
            raise ValueError(
                "ClipAwareAdamW does not support capturable=True (CUDA graphs): the controller "
                "and the non-finite check branch on host scalars; pass capturable=False"
            )
        if differentiable:
            raise ValueError("ClipAwareAdamW does not support differentiable=True; pass differentiable=False")
        if kernel is not None:
            deprecated(f"ClipAwareAdamW(kernel={kernel!r})", f"backend={kernel!r}")
            backend = kernel  # type: ignore[assignment]
        settings = check_settings(
            dict(
                gate=gate,
                controller=controller,
                tau=tau,
                alpha_init=alpha_init,
                backtrack=backtrack,
                shrink=shrink,
                grow=grow,
                reset_on_rollout=reset_on_rollout,
                shrink_momentum=shrink_momentum,
                max_backtracks=max_backtracks,
                nonfinite=nonfinite,
                backend=backend,
            )
        )
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
        # GradScaler must unscale and skip overflow steps itself (we pre-scale exp_avg).
        self._step_supports_amp_scaling = False
        for group in self.param_groups:
            fill_group(group)
        self.last_stats = {"kappa": 1.0, "alpha": 1.0, "overshoot_fraction": 0.0, "backtracks": 0.0}

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups; keep the settings and
        # last_stats too (the process-local attributes are not kept)
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
        for k, v in {**defaults(), **_LOCAL_ATTRS, "last_stats": {"kappa": 1.0, "alpha": 1.0}}.items():
            self.__dict__.setdefault(k, copy.deepcopy(v))
        self._step_supports_amp_scaling = False
        for group in self.param_groups:
            fill_group(group, loaded=True)

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
        if not isinstance(signal, TrustRegionSignal):
            raise TypeError(f"observe() expects a grpo_fix.TrustRegionSignal, got {type(signal).__name__}")
        if all_reduce:
            group = self._deepspeed.get("process_group") if self._deepspeed else None
            signal = signal.all_reduce(group)
        try:
            signal.validate()
        except ValueError:
            if self.nonfinite == "raise" or signal.is_finite():  # negative masses always raise
                raise
            warnings.warn(
                f"ClipAwareAdamW: non-finite TrustRegionSignal, skipping this window's steps: {signal.as_dict()}",
                RuntimeWarning,
                stacklevel=2,
            )
            for group in self.param_groups:
                group["ca_invalid"] = True
            return

        massless = float(signal.num_tokens) > 0 and float(signal.total_mass) == 0.0
        kappa = (0.0 if massless else float(signal.kappa)) if self.gate else 1.0
        f = float(signal.overshoot_fraction)
        informative = float(signal.num_eligible) > 0
        shrunk = False
        for group in self.param_groups:
            group["ca_invalid"] = False
            group["ca_kappa"] = kappa
            group["ca_f"] = f
            if self.controller:
                if signal.rollout_start and self.reset_on_rollout:
                    a = 1.0
                elif not group["ca_started"]:
                    a = self.alpha_init
                else:
                    a = float(group["ca_alpha"])
                group["ca_started"] = True
                group["ca_alpha"] = next_alpha(
                    a, f, informative=informative, tau=self.tau, shrink=self.shrink, grow=self.grow
                )
                shrunk = shrunk or f > self.tau
        if shrunk and self.shrink_momentum:
            # Momentum halving, applied lazily at each tensor's next step.  Walk self.state (keyed
            # by the stepped tensors, also the flat partitions that ZeRO-3 hides from the groups).
            for st in self.state.values():
                if "exp_avg" in st:
                    st["ca_m_scale"] = float(st.get("ca_m_scale", 1.0)) * self.shrink
        self.last_stats = {
            "kappa": kappa,
            "alpha": float(self.param_groups[0]["ca_alpha"]) if self.param_groups else 1.0,
            "overshoot_fraction": f,
            "backtracks": 0.0,
            "skipped_steps": float(self.skipped_steps),
        }

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite gradient or signal (``nonfinite="skip"``).

        Counted per param group (``group["ca_skipped"]``, so it is in the state dict and survives a
        resume; under ZeRO each group's ``step()`` call counts for its group) and reported as the
        maximum over groups, i.e. the number of skipped optimizer steps."""
        return int(max((g.get("ca_skipped", 0) for g in self.param_groups), default=0))

    @staticmethod
    def _count_skip(groups: list[dict[str, Any]]) -> None:
        for g in groups:
            g["ca_skipped"] = int(g.get("ca_skipped", 0)) + 1

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
            self._count_skip(groups)
            return loss

        collected = []
        all_grads: list[torch.Tensor] = []
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                collected.append((group, params))
                all_grads.extend(p.grad for p in params if p.grad is not None)
        if not collected:
            return loss
        if not _all_finite(all_grads):
            if self.nonfinite == "raise":
                raise FloatingPointError("ClipAwareAdamW: non-finite gradient (nonfinite='raise')")
            self._count_skip(groups)
            return loss

        bt_fn = self._backtrack_fn if self.backtrack else None
        stepped: list[torch.Tensor] = []
        before: list[torch.Tensor] = []
        if bt_fn is not None:
            if self._deepspeed is not None and self._deepspeed.get("refuse_backtrack"):
                raise RuntimeError(self._deepspeed["refuse_backtrack"])
            stepped = [p for _, ps in collected for p in ps]
            before = [p.detach().clone() for p in stepped]

        for group, _ in collected:
            self._step_group(group)

        if bt_fn is not None:
            bound = max(self.tau, max(float(g["ca_f"]) for g, _ in collected))
            stats = backtrack_step(
                bt_fn,
                stepped,
                before,
                [self.state[p]["exp_avg"] for p in stepped],
                bound=bound,
                max_backtracks=self.max_backtracks,
            )
            self.last_stats = dict(self.last_stats, **stats)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        exp_avgs: list[torch.Tensor] = []
        exp_avg_sqs: list[torch.Tensor] = []
        max_exp_avg_sqs: list[torch.Tensor] = []
        state_steps: list[torch.Tensor] = []
        has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        if not params:
            return
        beta1, beta2 = group["betas"]
        clip_aware_adamw(
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
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            fused=group["fused"],
            backend=self.backend,
            has_complex=has_complex,
        )


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One host sync per device: are all gradients finite?

    Uses the multi-tensor L2 norm: it is NaN/inf iff some element is, or if a tensor's norm
    overflows (> ~1.8e19 in fp32/bf16), which is treated as non-finite too.
    """
    by_dev: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_dev.setdefault(t.device, []).append(t)
    for ts in by_dev.values():
        norms = torch._foreach_norm(ts, 2)
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            return False
    return True
