"""Worker for test_window_invariance: each of 2 gloo ranks takes half the window in 2 micro-batches.

The window token count is all-reduced, each rank accumulates its micro-batch gradients, and the
ranks average their gradients (what DDP/DeepSpeed do); rank 0 saves the result.
"""

import sys

import torch
import torch.distributed as dist

from grpo_fix import GroupSurrogateLoss, prefix_consistent_advantages
from test_window_invariance import B, G, make_window


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, logp, old, _, mask, adv = make_window(0)
    adv = prefix_consistent_advantages(ids, adv, G, mask)  # rollout time, whole groups
    mine = torch.arange(B).chunk(world)[rank]
    n_local = mask[mine].sum().double()
    dist.all_reduce(n_local)  # the exact window count, all ranks
    loss_fn = GroupSurrogateLoss("uniform")
    leaf = logp.clone().requires_grad_()
    grad = torch.zeros_like(logp)
    micro = mine.chunk(2)
    for r in micro:
        out = loss_fn(leaf[r], old[r], adv[r], mask[r], group_size=None, num_window_tokens=n_local,
                      num_micro_batches=len(micro), dp_size=world)
        grad += torch.autograd.grad(out.loss, leaf)[0]
    dist.all_reduce(grad)
    grad /= world  # DDP averages
    if rank == 0:
        torch.save(grad, out_path)
    from tiny_trl import exit_after_barrier

    exit_after_barrier()  # not destroy_process_group + normal exit: gloo threads abort that now and then


if __name__ == "__main__":
    main(sys.argv[1])
