r"""ClipAwareAdamW: an AdamW that keeps a PPO/GRPO policy inside the clipping trust region.

Why (the paper's part, arXiv 2601.05002 Prop. 3 / Prop. 7, Eqs. 29-37)
---------------------------------------------------------------------
When one rollout batch is optimised for several inner steps, a token whose importance ratio has
left the clip region in its advantage's direction gets a zero advantage gradient (Eq. 28), but
AdamW's first moment keeps moving the parameters.  With a gradient constant for ``T`` steps and
zero afterwards, the step after the clip is ``C_T`` times the last pre-clip step (Eq. 32)

    C_T   = [beta1 (1 - beta1^(T-1)) / (1 - beta1^T)] * sqrt[(1 - beta2^T) / (beta2 (1 - beta2^(T-1)))]

and after ``k`` further clipped steps ``C_{T,k}`` (Eq. 36), which tends to
``(beta1 / sqrt(beta2))^(k+1)`` for large ``T`` (Eq. 37): 0.923, 0.853, 0.787, ... for
``(0.9, 0.95)``.  Clipping is a hard stop for the gradient but only a soft brake for the
trajectory.  The paper proves and quantifies this and leaves the correction to future work; the
three mechanisms below are ours (grpo-fix), built on the :class:`~grpo_fix.TrustRegionSignal`
the loss measures (``kappa``, the overshoot fraction ``f``, a rollout-boundary flag).

The three mechanisms (ours)
---------------------------
The trainer calls :meth:`ClipAwareAdamW.observe` once per optimizer window (after the forward
passes of its micro-batches, before the last backward under HF/accelerate + DeepSpeed, because
there the step runs inside that backward), with the window's signal summed over micro-batches
and all-reduced over data-parallel ranks (``signal.all_reduce()``).  The signal stays latched
for every ``step()`` call until the next ``observe``.

1. **gate** (free): ``m <- beta1 * kappa * m + (1 - beta1) * g`` with ``kappa = active/total``,
   the unclipped share of the advantage-gradient mass (1 without a signal).  Nothing clipped:
   exactly AdamW.  Everything clipped: the carried momentum is dropped, so the residual step of
   Prop. 3 is exactly zero (the mechanism of Eq. 29 is removed, not damped); a partly clipped
   window scales the residual by ``kappa``.  ``v`` is untouched.  A window that has tokens but
   no advantage-gradient mass at all (every advantage 0: a converged batch, constant-reward
   groups) gets ``kappa = 0``: its policy-gradient is exactly zero, so a step would be carried
   momentum alone, Prop. 3's drift with no signal behind it (ours; on the toy task such windows
   come once the policy has converged, and AdamW's drift through them is what collapsed the
   occasional converged run, see ``benchmarks/results/lr_robustness.md``).  A signal with no
   tokens (``TrustRegionSignal.zeros()``: nothing measured) keeps ``kappa = 1``.
2. **trust-region controller** (free, on by default): a step multiplier ``alpha`` in (0, 1]
   updated once per window at ``observe``: if ``f > tau`` (default 0.05): ``alpha *= shrink``
   (0.5), else ``alpha = min(1, grow * alpha)`` (1.25), except that a window without eligible
   tokens (no non-zero advantage, so no overshoot could be measured) leaves alpha unchanged.
   Optional **warm start**: before the first observed window alpha is ``alpha_init`` (default
   1.0; 0.1 then grows by ``grow`` per window without overshoot, about ten windows to 1),
   because the largest excursion of an off-policy run is its very first replay, caused by a step
   taken before anything was measured (Adam's first steps are sign-like, a full ``lr`` per
   coordinate).  It is not the default
   because on-policy training (one step per rollout batch) gains nothing from it and loses ten
   windows of step size (toy task, mu = 1: reward 0.75 instead of 0.94 after 25 rollouts); the
   TRL integration turns it on when the configuration replays rollouts (``num_iterations > 1``
   or ``steps_per_generation > gradient_accumulation_steps``).  Without ``observe`` alpha stays 1.
   ``alpha`` is **carried across rollout boundaries** and the momentum is **not** shrunk with it
   (both are options: ``reset_on_rollout=True`` resets alpha to 1 when the window starts a
   rollout batch, as DESIGN section 2 first specified; ``shrink_momentum=True`` also scales the
   momentum by ``shrink``, applied lazily per tensor at its next step).  Why, measured on the toy
   task (``grpo-fix experiment overshoot``, lr 3e-3, mu = 4; AdamW: overshoot fraction 0.179,
   per-step max excess 0.534, final reward 0.995, 3 seeds): reset + momentum shrink 0.065 / 0.108
   / 0.933; carried alpha + momentum shrink 0.037 / 0.061 / 0.936; carried alpha, momentum kept
   0.046 / 0.069 / 0.975.  Resetting makes the first steps of every batch overshoot at full size
   (the drift starts with the first step, not only after clipping), and shrinking the momentum
   throws away the cross-rollout direction that learning needs.  Then tau and the warm start, 8
   seeds, from (tau 0.02, alpha 1 from the start): tau 0.05 at mu = 4: overshoot 0.044 -> 0.048,
   reward 0.970 -> 0.990 (AdamW 0.178 / 0.994; the reward gap was ~2 seed sds: tau 0.02 held a
   tighter region than the reward needs); tau 0.05 + alpha_init 0.1: overshoot 0.040, run-wide
   max excess 0.72 -> 0.38, reward 0.989; mu = 2: overshoot 0.025 -> 0.013, max excess 0.72 ->
   0.10; mu = 8: 0.042 -> 0.045, 0.72 -> 0.30, reward 0.842 -> 0.890; lr 1e-3, mu = 4: 0.015 ->
   0.013, 0.36 -> 0.22, reward 0.951 -> 0.965.  The warm start removes most of the first
   excursion.  The Adam step uses ``lr * alpha``; ``group["lr"]`` is never modified (LR
   schedulers keep working) and ``alpha`` is stored in the param groups (``group["ca_alpha"]``,
   with the warm-start flag ``ca_started``), hence in the state dict.
   **Weight decay is NOT scaled by alpha**: the decoupled decay stays ``lr * wd`` per step.
   Our choice: alpha is a trust-region control of the *data* step (the part that moves the
   ratios); weight decay is a regulariser whose strength should follow the LR schedule alone,
   and scaling it would make the effective regularisation depend on how often the policy
   overshoots.  Implemented by passing ``lr * alpha`` and ``wd / alpha`` to the Adam update.
3. **backtrack** (opt-in, exact; one extra no-grad forward per step): after the step, the
   trainer-supplied callable (:meth:`set_backtrack_fn`) re-measures the micro-batch's ratios and
   returns a fresh signal; while its overshoot fraction exceeds ``max(tau, f_before)`` (and at
   most ``max_backtracks`` times) the step is pulled back along its own direction,
   ``theta = theta_before + a * delta`` with ``a`` halved; the first ``a`` within the bound is
   accepted and the momentum is scaled by it.  If no ``a`` is within the bound after
   ``max_backtracks`` halvings the step is rejected (``a = 0``: parameters restored, momentum
   zeroed, ``last_stats["rejected"] = 1``), so after every step the re-measured overshoot is at
   most ``max(tau, f_before)`` (ours: this makes the bound an invariant instead of a target).
   Needs the stepped tensors to be the model's parameters: without DeepSpeed, or DeepSpeed
   stage 0 in fp32.  Under ZeRO (or DeepSpeed's bf16/fp16 wrappers) the model holds low-precision
   copies refreshed only after ``step()``, so
   :func:`grpo_fix.integration.deepspeed.attach_deepspeed` refuses it with a clear error.

Measured evidence (DESIGN section 2; de-risking run, tiny random Qwen2, G=8, 4 inner epochs x 4
micro-batches per rollout batch, 25 rollout batches, 2 seeds; overshoot fraction averaged over
all inner steps; two seeds only, the experiments must confirm with more):

=============================  ===================  ===================
optimizer                      overshoot lr 3e-3     overshoot lr 1e-3
=============================  ===================  ===================
AdamW                          0.452                0.271
gate                           0.307                0.146
beta1 = 0                      0.468                0.361
Adam state reset per rollout   0.451                0.348
momentum projection            0.412                0.221
controller                     0.097                0.042
early stop of the inner loop   0.085                0.052
backtrack                      0.026                0.024
=============================  ===================  ===================

Max ``|log s|`` excess: AdamW 1.97 / 0.67, backtrack 0.08 / 0.075.  On a task that learns
(lr 1e-3 / 3e-4): overshoot AdamW 0.220 / 0.083, gate 0.156 / 0.043, gate + controller
0.047 / 0.015, backtrack 0.018 / 0.009; reward after 25 rollouts (from ~0.04): AdamW 0.65 / 0.58,
gate 0.53 / 0.76, gate + controller 0.89 / 0.83, backtrack 0.83 / 0.79.  So momentum is only part
of the drift (the fresh gradient of unclipped tokens moves shared parameters too); only
measured-ratio control gets near a real trust region.

Implementation notes
--------------------
- Drop-in: a subclass of ``torch.optim.AdamW`` with the same constructor and state schema
  (``step`` 0-dim tensor, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``); extra per-group
  scalars (``ca_alpha``, ``ca_kappa``, ``ca_f``, ``ca_invalid``, ``ca_skipped``) live in the param-group dicts, a
  pending momentum shrink lives as a Python float ``state[p]["ca_m_scale"]`` (added only after
  torch's lazy init).  Loading a plain ``torch.optim.AdamW`` state dict works.
- DeepSpeed-safe: no global step counter, no parameter shapes, empty groups skipped; every
  ``step()`` call (once per group under ZeRO-1/2, per sub-group under ZeRO-3, the zero-gradient
  step of DeepSpeed's bf16 wrapper at initialize) uses the latched signal; the controller
  updates once per window, at ``observe``.
- Kernels: CPU (and any non-Triton case) uses torch's own Adam kernels (``foreach``/``fused``/
  single-tensor, as the group asks) after scaling ``exp_avg`` by the gate's scalar (one
  ``_foreach_mul_``, only when it is not 1); CUDA uses the single-pass Triton kernel of
  :mod:`grpo_fix.kernels.adamw_step` (``backend="auto"``, one launch per tensor; not with
  ``amsgrad``, complex params, a tensor lr or ``fused=True``, which keep torch's kernels) where
  kappa and ``lr * alpha`` are scalars of the one pass.  On CPU pass ``fused=True`` for speed
  (torch's default there is the single-tensor loop); see ``benchmarks/bench_optimizer.py``.
- Non-finite input: ``nonfinite="skip"`` (default) skips a ``step()`` call whose gradients are
  not all finite, leaving parameters and state untouched and counting it in ``skipped_steps``;
  a non-finite signal marks its window invalid and every ``step()`` of that window is skipped
  (and counted) too.  ``"raise"`` raises instead.  Negative masses are a programming error and
  always raise.  Under ZeRO the check sees only this rank's partition: with
  ``gradient_clipping`` set a non-finite gradient makes the global norm, hence every partition,
  non-finite, so all ranks skip together.
- ``GradScaler``: ``_step_supports_amp_scaling`` is False, so the scaler unscales and skips
  overflow steps itself.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.adam import adam as _adam_functional

from ..options import Backend, check_backend, deprecated
from ..signal import TrustRegionSignal

__all__ = ["ClipAwareAdamW"]

_GROUP_DEFAULTS = {
    "ca_alpha": 1.0,
    "ca_kappa": 1.0,
    "ca_f": 0.0,
    "ca_invalid": False,
    "ca_skipped": 0,
    "ca_started": False,
}
_ATTR_DEFAULTS: dict[str, Any] = {
    "gate": True,
    "controller": True,
    "tau": 0.05,
    "alpha_init": 1.0,
    "backtrack": False,
    "shrink": 0.5,
    "grow": 1.25,
    "reset_on_rollout": False,
    "shrink_momentum": False,
    "max_backtracks": 5,
    "nonfinite": "skip",
    "backend": "auto",
    "last_stats": {"kappa": 1.0, "alpha": 1.0, "overshoot_fraction": 0.0, "backtracks": 0.0},
    "_backtrack_fn": None,
    "_deepspeed": None,
}
_PICKLED_ATTRS = tuple(k for k in _ATTR_DEFAULTS if not k.startswith("_"))


class ClipAwareAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` plus the clip-aware gate, trust-region controller and backtrack.

    Args (beyond ``torch.optim.AdamW``'s, which are accepted unchanged; ``capturable=True`` and
    ``differentiable=True`` are rejected):
        gate: scale the carried momentum by the signal's ``kappa`` (default True).
        controller: trust-region step multiplier ``alpha`` (default True).
        tau: overshoot-fraction threshold of the controller and backtrack (default 0.05).
        alpha_init: the controller's ``alpha`` before the first observed window (default 1.0;
            0.1 warm-starts, recommended when every rollout batch gets several optimizer steps).
            Without ``observe`` alpha stays 1.
        backtrack: pull steps back with :meth:`set_backtrack_fn`'s re-measure (default False).
        shrink, grow: controller factors (0.5, 1.25).
        reset_on_rollout: reset ``alpha`` to 1 at every rollout boundary (default False: alpha is
            carried across rollouts; see "Measured evidence").
        shrink_momentum: also scale the momentum by ``shrink`` when alpha shrinks (default False).
        max_backtracks: most halvings per step (5).
        nonfinite: ``"skip"`` or ``"raise"`` for non-finite gradients or signals.
        backend: ``"auto"`` (Triton on CUDA when available, torch otherwise), ``"torch"`` or
            ``"triton"``.

    Usage::

        opt = ClipAwareAdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
        for window in windows:
            sig = TrustRegionSignal.zeros()
            for mb in window:
                out = loss_fn(...); out.loss.backward(); sig = sig + out.signal
            opt.observe(sig.all_reduce().with_rollout_start(window.first))
            opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params,
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
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if kernel is not None:
            deprecated(f"ClipAwareAdamW(kernel={kernel!r})", f"backend={kernel!r}")
            backend = kernel  # type: ignore[assignment]
        check_backend(backend)
        if not 0.0 < shrink < 1.0:
            raise ValueError(f"shrink must be in (0, 1), got {shrink}")
        if grow < 1.0:
            raise ValueError(f"grow must be >= 1, got {grow}")
        if not tau >= 0.0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        if not 0.0 < alpha_init <= 1.0:
            raise ValueError(f"alpha_init must be in (0, 1], got {alpha_init}")
        if max_backtracks < 0:
            raise ValueError(f"max_backtracks must be >= 0, got {max_backtracks}")
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
        self.gate = bool(gate)
        self.controller = bool(controller)
        self.tau = float(tau)
        self.alpha_init = float(alpha_init)
        self.backtrack = bool(backtrack)
        self.shrink = float(shrink)
        self.grow = float(grow)
        self.reset_on_rollout = bool(reset_on_rollout)
        self.shrink_momentum = bool(shrink_momentum)
        self.max_backtracks = int(max_backtracks)
        self.nonfinite = nonfinite
        self.backend = backend
        self._backtrack_fn: Callable[[], TrustRegionSignal] | None = None
        self._deepspeed: dict[str, Any] | None = None  # set by integration.deepspeed.attach_deepspeed
        # GradScaler must unscale and skip overflow steps itself (we pre-scale exp_avg).
        self._step_supports_amp_scaling = False
        for group in self.param_groups:
            for k, v in _GROUP_DEFAULTS.items():
                group.setdefault(k, v)
        self.last_stats: dict[str, float] = {
            "kappa": 1.0,
            "alpha": 1.0,
            "overshoot_fraction": 0.0,
            "backtracks": 0.0,
        }

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups; keep our knobs too (the
        # backtrack callable and the DeepSpeed attachment are process-local and not kept)
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in _PICKLED_ATTRS if hasattr(self, k)})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        extra = {k: state.pop(k) for k in _PICKLED_ATTRS if k in state}
        if "kernel" in state:  # pickled by 0.1, which called the backend "kernel"
            extra.setdefault("backend", state.pop("kernel"))
        super().__setstate__(state)
        self.__dict__.update(extra)
        for k, v in _ATTR_DEFAULTS.items():  # unpickled from an older/plain AdamW pickle
            if not hasattr(self, k):
                setattr(self, k, copy.deepcopy(v))
        self._step_supports_amp_scaling = False
        for group in self.param_groups:
            # a checkpoint of an earlier ClipAwareAdamW (alpha but no start flag) has started;
            # a plain AdamW one has not, and warm-starts at its first observed window
            group.setdefault("ca_started", "ca_alpha" in group)
            for k, v in _GROUP_DEFAULTS.items():
                group.setdefault(k, v)

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
                if f > self.tau:
                    a *= self.shrink
                    shrunk = True
                elif informative:
                    a = min(1.0, self.grow * a)
                group["ca_alpha"] = a
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
    def step(self, closure=None):
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
                all_grads.extend(p.grad for p in params)
        if not collected:
            return loss
        if not _all_finite(all_grads):
            if self.nonfinite == "raise":
                raise FloatingPointError("ClipAwareAdamW: non-finite gradient (nonfinite='raise')")
            self._count_skip(groups)
            return loss

        bt_fn = self._backtrack_fn if self.backtrack else None
        if bt_fn is not None:
            if self._deepspeed is not None and self._deepspeed.get("refuse_backtrack"):
                raise RuntimeError(self._deepspeed["refuse_backtrack"])
            stepped = [p for _, ps in collected for p in ps]
            before = [p.detach().clone() for p in stepped]

        for group, _ in collected:
            self._step_group(group)

        if bt_fn is not None:
            self._backtrack(bt_fn, collected, stepped, before)
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
        kappa = float(group["ca_kappa"]) if self.gate else 1.0
        alpha = float(group["ca_alpha"]) if self.controller else 1.0
        m_scales = [kappa * float(self.state[p].pop("ca_m_scale", 1.0)) for p in params]

        if self._use_triton(group, params, has_complex, state_steps):
            from grpo_fix.kernels.adamw_step import adamw_step_

            adamw_step_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                state_steps,
                lr=float(group["lr"]),
                alpha=alpha,
                beta1=float(beta1),
                beta2=float(beta2),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                m_scales=m_scales,
                maximize=group["maximize"],
            )
            return

        # gate + pending momentum shrink: one foreach multiply per distinct scale (usually one)
        by_scale: dict[float, list[torch.Tensor]] = {}
        for m, s in zip(exp_avgs, m_scales):
            if s != 1.0:
                by_scale.setdefault(s, []).append(m)
        for s, ms in by_scale.items():
            torch._foreach_mul_(ms, s)

        lr = group["lr"]
        wd = group["weight_decay"]
        if alpha != 1.0:
            lr = lr * alpha
            wd = wd / alpha  # keep the decoupled decay lr * wd (see the module docstring)
        _adam_functional(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            state_steps,
            foreach=group["foreach"],
            capturable=False,
            differentiable=False,
            fused=group["fused"],
            grad_scale=None,
            found_inf=None,
            has_complex=has_complex,
            decoupled_weight_decay=True,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=wd,
            eps=group["eps"],
            maximize=group["maximize"],
        )

    def _use_triton(self, group, params, has_complex, state_steps) -> bool:
        if self.backend == "torch":
            return False
        ok = (
            not has_complex
            and not group["amsgrad"]
            and not torch.is_tensor(group["lr"])
            and all(p.is_contiguous() for p in params)
        )
        if self.backend == "triton":
            if not ok:
                raise ValueError("backend='triton' supports real, contiguous tensors without amsgrad and a float lr")
            return True
        if not ok or not all(p.is_cuda for p in params):
            return False
        if any(st.is_cuda for st in state_steps):
            # fused=True hosts `step` on the GPU: reading it per tensor would sync; use torch's fused kernel
            return False
        from grpo_fix.kernels.adamw_step import triton_available

        return triton_available()

    def _backtrack(self, fn, collected, stepped, before) -> None:
        f_before = max(float(g["ca_f"]) for g, _ in collected)
        bound = max(self.tau, f_before)
        deltas = torch._foreach_sub(stepped, before)
        a, tries = 1.0, 0
        f = self._measure(fn)
        while f > bound and tries < self.max_backtracks:
            a *= 0.5
            tries += 1
            for p, b, d in zip(stepped, before, deltas):
                p.copy_(b + a * d)
            f = self._measure(fn)
        rejected = f > bound
        if rejected:
            # no step size within max_backtracks keeps the trust region: reject the step (a = 0),
            # so the overshoot never exceeds max(tau, f_before) after an accepted window
            a = 0.0
            for p, b in zip(stepped, before):
                p.copy_(b)
        if a != 1.0:
            ms = [self.state[p]["exp_avg"] for p in stepped]
            torch._foreach_mul_(ms, a)
        self.last_stats = dict(
            self.last_stats, backtracks=float(tries), backtrack_scale=a, rejected=float(rejected), overshoot_after=f
        )

    @staticmethod
    def _measure(fn) -> float:
        with torch.no_grad():
            sig = fn()
        if not isinstance(sig, TrustRegionSignal):
            raise TypeError(f"the backtrack fn must return a TrustRegionSignal, got {type(sig).__name__}")
        sig.validate()
        return float(sig.overshoot_fraction)


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One host sync per device: are all gradients finite?

    Uses the multi-tensor L2 norm (the fastest read-only reduction torch has on CPU and CUDA; the
    inf-norm is ~20x slower on CPU): it is NaN/inf iff some element is, or if a tensor's norm
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
