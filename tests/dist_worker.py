"""Worker for tests/test_distributed.py: one LoRA training step under DDP or FSDP2 (fully_shard) on
CPU with gloo, 2 processes (torch.multiprocessing.spawn); rank 0 saves the full gradients and
parameters. Run: python tests/dist_worker.py ddp|fsdp OUT.pt"""
import os, sys, tempfile, torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn

def build():
    """Tiny MLP with LoRA on both layers (same seed in every process)."""
    import pyhappy
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    pyhappy.inject(m, ["0", "2"], r=4, init="none")
    return m

def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 32, generator=g), torch.randn(8, 8, generator=g)

def step(model, x, y):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    return grads

def worker(rank, world, init_file, mode, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = build()
    x, y = data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in (model[0], model[2]):
            fully_shard(layer)
        wrapped = fully_shard(model)
    grads = step(wrapped, xs, ys)
    if mode == "fsdp":
        grads = {n: (g.full_tensor() if hasattr(g, "full_tensor") else g) for n, g in grads.items()}
        params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
    else:
        params = {n: p.detach() for n, p in model.named_parameters()}
    grads = {n.removeprefix("module."): g for n, g in grads.items()}
    params = {n.removeprefix("module."): p for n, p in params.items()}
    if rank == 0:
        torch.save({"grads": grads, "params": params}, out)
    # Every collective finished on both ranks before the group goes away: without this barrier the
    # gloo worker threads were torn down mid-flight now and then ("terminate called without an
    # active exception", SIGABRT, ~1 run in 16 with FSDP2).
    dist.barrier()
    dist.destroy_process_group()
    # The barrier did not remove the abort entirely (CI, 1 run in ~30 under pytest load): it comes
    # from gloo's threads being destroyed during interpreter teardown. Everything this worker owes
    # is on disk (torch.save closed the file) and the group is gone, so leave without teardown.
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)

if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    init_file = tempfile.mktemp()
    mp.spawn(worker, args=(2, init_file, mode, out), nprocs=2, join=True)
