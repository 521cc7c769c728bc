"""Shared-prefix classes inside a group, prefix-consistent advantages and the prefix aggregate W_agg.

Paper, Prop. 1 (Eqs. 16-18): for completions of one group that share the prefix y_{1:k}, the
gradient restricted to that prefix is

    sum_{t<=k} grad log pi(y_t | x, y_<t) * W_agg,        W_agg = sum_{i in shared} omega_i A_i,
    omega_{i,t} = alpha_{i,t} s_{i,t}                                          (Eq. 18)

which cancels for a prefix shared by the whole group only if omega is constant across it.

**Prefix-consistent clipping (ours, not in the paper).**  Clipping is sign dependent: when the
common ratio of a shared prefix token leaves ``[1 - eps_low, 1 + eps_high]`` the min of Eq. 1
zeroes only the members whose advantage pushes further out, so the cancellation breaks even
with uniform alpha.  We clip a *class* (the tokens at position t of the completions of one group
that agree on all tokens up to and including t) as one token carrying the summed advantage of
its members.  All members share the ratio (token-level ratios, same context), so this equals
giving every member the class-mean advantage at that position::

    A~_{i,t} = (1 / |C(i,t)|) * sum_{j in C(i,t)} A_{j,t}

computed once at rollout time, so it stays exact when a group is later split across
micro-batches or ranks.  Tokens unique to one completion keep their own advantage; a prefix
shared by the whole group gets mean(A) = 0 (centred advantages), i.e. exactly zero gradient,
clipped or not.

**How classes are found, exactly and in O(B*T) memory.**  Rows are sorted lexicographically by
(group, token ids) with ``torch.unique(dim=0)``; rows sharing a prefix are then contiguous, and
row k starts a new class at position t iff it belongs to another group than row k-1 or their
longest common prefix is at most t.  A cumulative sum over the sorted rows numbers the classes
at each position.  No hashing, so no collisions; nothing larger than (B, T) is materialised.
Membership counts only valid (mask = 1) tokens; masked positions still count as context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefixClasses:
    """Class structure of a batch, found once at rollout time (:func:`prefix_classes`).

    ``index`` (B, T) int64 in ``[0, B*T)`` names the class of each position (positions with equal
    index share group, position and prefix); ``size`` (B, T) is the number of *valid* members of
    that class; ``whole`` (B, T) bool marks the valid positions of classes shared by the whole group
    (``size == group_size``: the prefixes of Prop. 1's W_agg).

    Compact forms, so that a loss call touches only the positions that share a prefix:
    ``shared`` / ``shared_class`` are the flat valid positions of classes with more than one valid
    member and their class numbered ``0..K-1``, ``shared_size`` those classes' sizes (float64);
    ``whole_positions`` / ``whole_class`` the same for the whole-group classes.
    """

    index: torch.Tensor
    size: torch.Tensor
    whole: torch.Tensor
    shared: torch.Tensor
    shared_class: torch.Tensor
    shared_size: torch.Tensor
    whole_positions: torch.Tensor
    whole_class: torch.Tensor

    @classmethod
    def build(cls, index: torch.Tensor, size: torch.Tensor, valid: torch.Tensor, group_size: int) -> PrefixClasses:
        """The classes with their compact forms (host syncs: done at rollout time)."""
        flat_index, flat_size, flat_valid = index.reshape(-1), size.reshape(-1), valid.reshape(-1)
        whole = valid & (size == group_size)

        def compact(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            positions = selected.nonzero().squeeze(1)
            _, numbered = torch.unique(flat_index.index_select(0, positions), return_inverse=True)
            return positions, numbered

        shared, shared_class = compact(flat_valid & (flat_size > 1))
        whole_positions, whole_class = compact(whole.reshape(-1))
        return cls(
            index,
            size,
            whole,
            shared,
            shared_class,
            flat_size.index_select(0, shared).double(),
            whole_positions,
            whole_class,
        )

    def class_mean(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (0 where masked) with every shared position replaced by the mean of its class's
        valid members (in float64, returned in ``values``' dtype); other positions unchanged."""
        if not self.shared.numel():
            return values
        flat = values.reshape(-1)
        sums = torch.zeros(self.shared.numel(), dtype=torch.float64, device=values.device)
        sums.index_add_(0, self.shared_class, flat.index_select(0, self.shared).double())
        means = (sums.index_select(0, self.shared_class) / self.shared_size).to(values.dtype)
        return flat.index_put((self.shared,), means).view_as(values)


def _check_ids(completion_ids: torch.Tensor, group_size: int, mask: torch.Tensor | None) -> None:
    for name, t in (("completion_ids", completion_ids), ("mask", mask)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be (B, T), got shape {tuple(completion_ids.shape)}")
    if completion_ids.dtype.is_floating_point or completion_ids.dtype == torch.bool:
        raise ValueError(f"completion_ids must be an integer tensor, got {completion_ids.dtype}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if completion_ids.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the batch of {completion_ids.shape[0]} rows; "
            "groups are consecutive blocks of group_size rows, so pass whole groups"
        )
    if mask is not None and tuple(mask.shape) != tuple(completion_ids.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != completion_ids shape {tuple(completion_ids.shape)}")
    if mask is not None and mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must contain only 0 and 1")


def prefix_classes(completion_ids: torch.Tensor, group_size: int, mask: torch.Tensor | None = None) -> PrefixClasses:
    """Find the shared-prefix classes of every (row, position) (see the module docstring)."""
    _check_ids(completion_ids, group_size, mask)
    B, T = completion_ids.shape
    device = completion_ids.device
    valid = torch.ones(B, T, dtype=torch.bool, device=device) if mask is None else mask.to(torch.bool)
    if B == 0 or T == 0:
        empty = torch.zeros(B, T, dtype=torch.long, device=device)
        return PrefixClasses.build(empty, empty.clone(), valid, group_size)
    group = torch.arange(B, device=device).div(group_size, rounding_mode="floor")
    keyed = torch.cat([group[:, None], completion_ids.long()], dim=1)
    _, rank = torch.unique(keyed, dim=0, return_inverse=True)  # lexicographic rank of each row
    order = torch.sort(rank, stable=True).indices
    ids_sorted, group_sorted = completion_ids[order], group[order]

    positions = torch.arange(T, device=device)
    differs = ids_sorted[1:] != ids_sorted[:-1]  # (B-1, T)
    first_diff = torch.where(differs.any(1), differs.to(torch.int8).argmax(1), torch.full_like(group[1:], T))
    same_group = group_sorted[1:] == group_sorted[:-1]
    starts = torch.ones(B, T, dtype=torch.bool, device=device)
    starts[1:] = ~same_group[:, None] | (positions[None, :] >= first_diff[:, None])
    class_at_t = torch.cumsum(starts.to(torch.long), dim=0) - 1  # (B, T), < B

    index = torch.empty_like(class_at_t)
    index[order] = class_at_t * T + positions[None, :]
    flat = index.reshape(-1)
    size = torch.zeros(B * T, dtype=torch.long, device=device)
    size.scatter_add_(0, flat, valid.reshape(-1).to(torch.long))
    return PrefixClasses.build(index, size[flat].view(B, T), valid, group_size)


@torch.no_grad()
def prefix_consistent_advantages(
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    group_size: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token advantages ``(B, T)`` with each shared-prefix class given its members' mean.

    Args:
        completion_ids: ``(B, T)`` integer token ids; groups are consecutive blocks of ``group_size`` rows.
        advantages: ``(B,)`` sequence advantages or ``(B, T)`` per-token advantages.
        group_size: completions per prompt (G).
        mask: ``(B, T)`` valid-token mask (bool or 0/1); only valid tokens are class members.

    Returns a float tensor of the advantages' dtype (float32 for integer input).  Call it once at
    rollout time over whole groups (gather the completions of a group first when they are spread
    over ranks), then slice rows freely: the result does not depend on later batching.  At
    positions with mask 0 it returns the input advantage (those positions carry no loss).
    """
    _check_ids(completion_ids, group_size, mask)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    B, T = completion_ids.shape
    adv = advantages if advantages.dtype.is_floating_point else advantages.float()
    if adv.dim() == 1 and adv.shape[0] == B:
        adv = adv[:, None].expand(B, T)
    elif tuple(adv.shape) != (B, T):
        raise ValueError(f"advantages must be (B,) or (B, T) = {(B, T)}, got {tuple(advantages.shape)}")
    valid = torch.ones(B, T, dtype=torch.bool, device=adv.device) if mask is None else mask.to(torch.bool)
    if bool((~torch.isfinite(adv) & valid).any()):
        raise ValueError(
            "advantages contain NaN/inf at valid (mask=1) positions; a class mean would spread it "
            "to every completion sharing the prefix"
        )
    classes = prefix_classes(completion_ids, group_size, valid)
    kept = torch.where(valid, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))
    return torch.where(valid, classes.class_mean(kept), adv).contiguous()


@torch.no_grad()
def whole_group_prefix_aggregate(
    classes: PrefixClasses, coefficient: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """W_agg on prefixes shared by the whole group (Prop. 1).

    ``coefficient`` (B, T) is the signed advantage-gradient coefficient of each token,
    ``omega_{i,t} A_{i,t}`` including the clip indicator (so that the sum over a class equals
    minus the summed gradient of the loss w.r.t. the members' log-probs).  Returns
    ``(w_agg, w_agg_abs)``: the sum over whole-group classes of ``W_c`` and of ``|W_c|``
    (float64 scalars, summed over the whole-group positions only).  Both are exactly 0 for the
    corrected loss.  ``classes`` must come from the call's mask.
    """
    sums = torch.zeros(classes.whole_positions.numel(), dtype=torch.float64, device=coefficient.device)
    sums.index_add_(0, classes.whole_class, coefficient.reshape(-1).index_select(0, classes.whole_positions).double())
    return sums.sum(), sums.abs().sum()
