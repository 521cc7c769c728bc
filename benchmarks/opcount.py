"""Count the eager torch ops and host syncs of a call, forward and backward, on any device.

Why: on a GPU every eager op is a kernel launch (a few microseconds each), and every host sync
makes the CPU wait for the queued kernels before it can launch the next ones.  Both are fixed
costs per call that a CPU timing hides, so they are counted instead, on CPU, exactly: each op that
reaches the dispatcher is recorded by a ``TorchDispatchMode`` (composite ops arrive already
decomposed, as they would launch on CUDA); ``launches`` leaves out the ops that launch no kernel
(views, metadata, uninitialised allocations).

An op counts as a **sync** when on CUDA it would block the host: it reads a value
(``_local_scalar_dense``: ``.item()``, ``float(t)``, ``bool(t)``; ``is_nonzero``, ``equal``) or
its output size depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean-mask
indexing, ``repeat_interleave`` with tensor repeats and no ``output_size``, ``bincount``).

Usage::

    from opcount import count_forward_backward
    fwd, bwd = count_forward_backward(lambda: loss_fn(logp, ...).loss)
    fwd.ops, fwd.launches, fwd.syncs, bwd.ops       # numbers
    fwd.names                                       # the ops in order ("SYNC:" marks a sync)

``OpCounter.region(label)`` tags the ops dispatched inside it (e.g. the part of a loss that
``torch.compile`` fuses on CUDA: ``fwd.in_region[label]``); ``OpCounter.opaque(label)`` records one
marker for a whole call (a Triton kernel launch) and nothing it dispatches inside.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Ops that block the host on CUDA whatever their arguments.
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "nonzero",
        "masked_select",
        "unique_dim",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim_consecutive",
        "bincount",
    }
)
SYNC_PREFIX = "SYNC:"
#: Ops that launch no kernel on CUDA: views, metadata and allocation without initialisation.
NO_KERNEL_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "expand",
        "detach",
        "alias",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "as_strided",
        "t",
        "transpose",
        "permute",
        "unbind",
        "split",
        "split_with_sizes",
        "narrow",
        "diagonal",
        "lift_fresh",
        "promote_types",
        "result_type",
        "empty",
        "empty_like",
        "empty_strided",
    }
)


def is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the op ``name`` (an overload packet name) with these arguments would sync on CUDA."""
    if name in SYNC_OPS:
        return True
    if name in ("index", "index_put", "index_put_"):  # boolean-mask indexing: data-dependent size
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if name == "repeat_interleave":  # tensor repeats: the output size is their sum
        repeats = args[1] if len(args) > 1 else (args[0] if args else None)
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


@dataclass
class OpCounts:
    """What one counted call dispatched: ``names`` in order (``"SYNC:"`` prefixes a sync,
    ``"<label>"`` marks an opaque call) and, per region label, how many ops ran inside it."""

    names: list[str] = field(default_factory=list)
    in_region: Counter = field(default_factory=Counter)

    @property
    def ops(self) -> int:
        """Dispatched ops, syncs and opaque markers included."""
        return len(self.names)

    @property
    def launches(self) -> int:
        """Ops that launch work on the device (a kernel, or the copy of a sync): :attr:`ops` minus
        views, metadata and uninitialised allocations (:data:`NO_KERNEL_OPS`)."""
        return sum(n.removeprefix(SYNC_PREFIX) not in NO_KERNEL_OPS for n in self.names)

    @property
    def syncs(self) -> int:
        return sum(n.startswith(SYNC_PREFIX) for n in self.names)

    @property
    def sync_positions(self) -> list[int]:
        """Indices of the syncs in :attr:`names` (a sync at ``ops - 1`` is the call's last op)."""
        return [i for i, n in enumerate(self.names) if n.startswith(SYNC_PREFIX)]

    def histogram(self) -> Counter:
        """How often each op name occurs (sync prefix kept)."""
        return Counter(self.names)

    def as_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "launches": self.launches, "syncs": self.syncs, "in_region": dict(self.in_region)}


class OpCounter(TorchDispatchMode):
    """Records every dispatched op into :attr:`counts` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = OpCounts()
        self._paused = 0
        self._regions: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            name = func.overloadpacket.__name__
            self.counts.names.append(SYNC_PREFIX + name if is_sync(name, args, kwargs) else name)
            for label in set(self._regions):
                self.counts.in_region[label] += 1
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def region(self, label: str) -> Iterator[None]:
        """Tag the ops dispatched inside with ``label`` (they are still counted)."""
        self._regions.append(label)
        try:
            yield
        finally:
            self._regions.pop()

    @contextlib.contextmanager
    def opaque(self, label: str) -> Iterator[None]:
        """Record one ``<label>`` marker and none of the ops dispatched inside (a kernel launch)."""
        self.counts.names.append(f"<{label}>")
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


def _loss_of(result: Any) -> torch.Tensor:
    loss = getattr(result, "loss", result)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the counted call must return a tensor or an object with .loss, got {type(result).__name__}")
    return loss


def count_forward_backward(
    call: Callable[[], Any], *, setup: Callable[[OpCounter], contextlib.AbstractContextManager] | None = None
) -> tuple[OpCounts, OpCounts]:
    """Run ``call()`` (returning a scalar loss, or an object with ``.loss``) and its backward, each
    under its own :class:`OpCounter`; return ``(forward counts, backward counts)``.

    ``setup(counter)``, if given, returns a context manager entered around each phase with the
    counter active, e.g. one that patches a function to run inside ``counter.region(...)``.
    """
    phases = []
    loss = None
    for phase in ("forward", "backward"):
        counter = OpCounter()
        with counter, setup(counter) if setup else contextlib.nullcontext():
            if phase == "forward":
                loss = _loss_of(call())
            else:
                loss.backward()
        phases.append(counter.counts)
    return phases[0], phases[1]
