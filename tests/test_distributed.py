"""Sequence-parallel TRD over gloo: 2 and 4 spawned CPU processes against the one-process result."""
import os
import tempfile
import traceback

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.multiprocessing as mp

from vrepa_kernels import trd_loss
from vrepa_kernels.schedule import balance, strips

from utils import cpu_backends

SLICES = {2: [23, 37], 4: [11, 1, 29, 19]}  # uneven; frames of 6 tokens straddle ranks
CASES = [("full", None, "mean"), ("spatial", 10, "mean"), ("temporal", 10, "none"), ("temporal", 4, "sum")]


def _inputs(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(2, n, 12, generator=gen, dtype=torch.float64)
    teacher = student[..., :8] + 0.7 * torch.randn(2, n, 8, generator=gen, dtype=torch.float64)
    return student, teacher


def _worker(rank, world, init_file, backends, queue):
    try:
        if "triton" in backends:
            os.environ["TRITON_INTERPRET"] = "1"
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        sizes = SLICES[world]
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        student, teacher = _inputs(sum(sizes))
        results = []
        for backend in backends:
            dtype = torch.float32 if backend == "triton" else torch.float64
            for relation, frames, reduction in CASES:
                s = student[:, lo:hi].to(dtype).clone().requires_grad_(True)
                t = teacher[:, lo:hi].to(dtype).clone().requires_grad_(True)
                loss = trd_loss(s, t, 0.1, relation, frames, reduction, backend=backend, process_group=dist.group.WORLD)
                loss.sum().backward()
                # numpy pickles by value: the worker may exit before the parent reads
                results.append((backend, relation, frames, reduction,
                                *[x.detach().numpy() for x in (loss, s.grad, t.grad)]))
        s = student[:, lo:hi].clone().requires_grad_(True)
        loss = trd_loss(s, teacher[:, lo:hi], process_group=dist.group.WORLD)
        try:  # raised by the backward on each rank alone: no collective, no hang
            torch.autograd.grad(loss, s, create_graph=True)
            results.append(("second_order", None))
        except RuntimeError as exc:
            results.append(("second_order", str(exc)))
        with fwAD.dual_level():  # forward mode: each rank would see only its slice's tangent, so it raises
            try:
                trd_loss(fwAD.make_dual(s.detach(), torch.ones_like(s)), teacher[:, lo:hi],
                         process_group=dist.group.WORLD)
                results.append(("forward_mode", None))
            except RuntimeError as exc:
                results.append(("forward_mode", str(exc)))
        try:
            trd_loss(student[:, lo:hi], teacher[:, lo:hi], relation="spatial", num_frames=7,
                     process_group=dist.group.WORLD)
            results.append(("error", None))
        except ValueError as exc:  # every rank raises, none hangs
            results.append(("error", str(exc)))
        bad_teacher = teacher[:, lo:hi].clone()
        if rank == world - 1:
            bad_teacher[0, 0, 0] = float("nan")
        try:  # only the last rank holds the NaN, yet every rank raises
            trd_loss(student[:, lo:hi], bad_teacher, check_finite=True, process_group=dist.group.WORLD)
            results.append(("nan", None))
        except ValueError as exc:
            results.append(("nan", str(exc)))
        queue.put((rank, results))
        dist.destroy_process_group()
    except Exception:
        queue.put((rank, traceback.format_exc()))


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_matches_one_process(world):
    backends = cpu_backends()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(tmp, "init"), backends, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        outputs = dict(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    for rank, out in outputs.items():
        assert not isinstance(out, str), f"rank {rank} failed:\n{out}"

    sizes = SLICES[world]
    student, teacher = _inputs(sum(sizes))
    for i, (backend, relation, frames, reduction, _, _, _) in enumerate(outputs[0][:-4]):
        dtype = torch.float32 if backend == "triton" else torch.float64
        s = student.to(dtype).clone().requires_grad_(True)
        t = teacher.to(dtype).clone().requires_grad_(True)
        want = trd_loss(s, t, 0.1, relation, frames, reduction, backend="torch")
        want.sum().backward()
        tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-13)
        for rank in range(world):
            loss, g_s, g_t = [torch.from_numpy(x) for x in outputs[rank][i][4:]]
            lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
            torch.testing.assert_close(loss, want.detach(), **tol)
            torch.testing.assert_close(g_s, s.grad[:, lo:hi], **tol)
            torch.testing.assert_close(g_t, t.grad[:, lo:hi], **tol)
    for rank in range(world):
        for entry, derivative in ((-4, "second-order"), (-3, "forward-mode")):
            message = outputs[rank][entry][1]
            assert message is not None and "trd_loss(..., process_group=...)" in message
            assert derivative in message and "without process_group" in message
        assert outputs[rank][-2][1] is not None and "num_frames=7" in outputs[rank][-2][1]
        assert outputs[rank][-1][1] is not None
        assert ("teacher holds NaN" if rank == world - 1 else "rejected their shards") in outputs[rank][-1][1]


def test_balance_splits_the_triangle_evenly():
    from vrepa_kernels.relation import RelationSpec

    spec = RelationSpec(1, 4096, "full")
    all_strips = strips(spec, 64)
    costs = [(r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in all_strips]
    for world in (2, 3, 4, 8):
        parts = balance(costs, world)
        assert sorted(i for p in parts for i in p) == list(range(len(costs)))  # each strip exactly once
        loads = [sum(costs[i] for i in p) for p in parts]
        assert max(loads) <= 1.05 * sum(costs) / world
