"""Run under `torchrun --nproc_per_node=2` (gloo): MoCo's cross-rank mechanics on real DDP.

Exits non-zero with a message when a check fails. Used by tests/test_pretrain.py.
"""
import sys

import ignite.distributed as idist
import torch
import torch.distributed as dist


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from medmoco.models import build_moco

    torch.manual_seed(0)  # same initial weights and queue on every rank
    model = build_moco("resnet18", in_channels=3, dim=16, K=32, m=0.9, mlp=True)
    moco = model
    # shuffle + unshuffle returns each rank's own keys in order
    x = torch.arange(8 * 3, dtype=torch.float32).view(8, 3) + 1000 * rank
    shuffled, idx_unshuffle = moco._batch_shuffle(x)
    back = moco._batch_unshuffle(shuffled, idx_unshuffle)
    if not torch.equal(back, x):
        print(f"rank {rank}: shuffle + unshuffle changed the keys", file=sys.stderr)
        return 1
    ddp = idist.auto_model(model, sync_bn=False, broadcast_buffers=False)
    optimizer = torch.optim.SGD([p for p in moco.encoder_q.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(100 + rank)  # different data per rank
    for step in range(3):
        im_q, im_k = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
        logits, labels = ddp(im_q, im_k)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        queues = [torch.empty_like(moco.queue) for _ in range(world)]
        dist.all_gather(queues, moco.queue)
        if not all(torch.equal(queues[0], q) for q in queues):
            print(f"rank {rank}: queues differ after step {step}", file=sys.stderr)
            return 1
        if int(moco.queue_ptr) != (step + 1) * 4 * world % 32:
            print(f"rank {rank}: queue_ptr {int(moco.queue_ptr)} after step {step}", file=sys.stderr)
            return 1
    params = [torch.cat([p.detach().flatten() for p in moco.encoder_q.parameters()])]
    gathered = [torch.empty_like(params[0]) for _ in range(world)]
    dist.all_gather(gathered, params[0])
    if not torch.equal(gathered[0], gathered[1]):
        print("query encoders diverged across ranks", file=sys.stderr)
        return 1
    dist.destroy_process_group()
    print(f"rank {rank}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
