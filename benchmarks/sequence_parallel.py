"""Sequence-parallel TRD simulated on one CPU: W gloo processes, each timing ``trd_loss(..., process_group=)``.

    python benchmarks/run.py --world-size 2 4 --n 4096 --d 256 --relation full temporal --frames 16 --out DIR
    python benchmarks/sequence_parallel.py --world-size 2 --n 4096 --shards uneven      # same options

For every case and world size W it spawns W processes (gloo, initialised through a file), gives rank r a
contiguous slice of the tokens and reports per rank: the time of one step (median and quartiles after
warm-up), its share of the pair work (``vrepa_kernels.schedule``), the bytes its collectives move per step
as the docstring of ``vrepa_kernels.distributed`` gives them, the one-process time for the whole shape with
the same threads per process, and how far its loss and gradient are from the one-process result.
Writes sequence_parallel.json and sequence_parallel.md to --out. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vrepa_kernels import trd_loss  # noqa: E402
from vrepa_kernels.backends.torch_backend import strip_rows  # noqa: E402
from vrepa_kernels.relation import canonicalize  # noqa: E402
from vrepa_kernels.schedule import strips_for  # noqa: E402

import impls as registry  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402
from cases import Case, add_case_args, custom_cases  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BACKEND = "torch"  # the only backend with a CPU speed path
WARMUP_STEPS = 2
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, nargs="+", required=True, help="processes (ranks) to simulate")
    add_case_args(p)
    p.add_argument("--shards", default="even", help="'even', 'uneven' (rank r gets a share ∝ W + r) or sizes, "
                                                    "e.g. 25,39 (one world size and one N only)")
    p.add_argument("--threads-per-rank", type=int, help="torch threads per process (default: cores // max W)")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/cpu-<date>/sequence_parallel)")
    measure.add_repeat_args(p, "timed steps")
    p.add_argument("--seed", type=int, default=0)
    args, unknown = p.parse_known_args(argv)
    if set(unknown) - {"--no-plots", "--no-progress"}:  # run.py options that mean nothing here
        p.error(f"unrecognised arguments for the --world-size simulation: {' '.join(unknown)}")
    if min(args.world_size) < 1:
        p.error(f"--world-size must be >= 1, got {args.world_size}")
    args.threads_per_rank = args.threads_per_rank or max(1, CORES // max(args.world_size))
    return args


def shard_sizes(n: int, world: int, shards: str) -> List[int]:
    """Contiguous slice lengths, in rank order, for ``--shards``."""
    if shards == "even":
        sizes = [n // world + (r < n % world) for r in range(world)]
    elif shards == "uneven":
        weights = [world + r for r in range(world)]
        sizes = [n * w // sum(weights) for w in weights]
        sizes[-1] += n - sum(sizes)
    else:
        try:
            sizes = [int(x) for x in shards.split(",")]
        except ValueError:
            raise ValueError(f"--shards must be 'even', 'uneven' or comma-separated sizes, got {shards!r}") from None
        if len(sizes) != world or sum(sizes) != n:
            raise ValueError(f"--shards {shards} must give {world} sizes summing to N={n}")
    if min(sizes) < 1:
        raise ValueError(f"every rank needs at least one token: --shards {shards} gives {sizes} for N={n}, W={world}")
    return sizes


def pair_shares(case: Case, world: int) -> List[float]:
    """Each rank's share of the pair elements (masked ones included) of the torch backend's strips."""
    whole = torch.empty(case.batch, case.n, 1, device="meta")
    spec = canonicalize(whole, whole, case.margin, case.relation, case.num_frames)[2]
    work = [sum((r1 - r0) * (c1 - c0) for _, (r0, r1, c0, c1) in strips_for(spec, strip_rows(case.batch, case.n),
                                                                            (rank, world))) for rank in range(world)]
    return [w / sum(work) for w in work]


def analytic_bytes(case: Case, sizes: Sequence[int]) -> Dict[str, int]:
    """Per-step volumes of vrepa_kernels.distributed (its docstring), in bytes, teacher frozen.

    Gathered: every slice padded to the longest, W·B·max(N_r)·(Ds+Dt) elements (``docstring_``: B·N·(Ds+Dt),
    the same for even slices). All-reduced: B fp32 sums and, with a student gradient, B·N·Ds fp32 values.
    ``ring_wire_bytes``: what each rank sends under ring all-gather / all-reduce.
    """
    world, b, elem = len(sizes), case.batch, case.torch_dtype.itemsize
    reduced = 4 * b * (1 + (case.n * case.ds if case.mode == "fwd+bwd" else 0))
    gathered = world * b * max(sizes) * (case.ds + case.dt) * elem
    return dict(gathered_bytes=gathered, docstring_gathered_bytes=b * case.n * (case.ds + case.dt) * elem,
                allreduced_bytes=reduced,
                ring_wire_bytes=round(gathered * (world - 1) / world + reduced * 2 * (world - 1) / world))


def _loss(case: Case, group=None):
    return lambda s, t: trd_loss(s, t, case.margin, case.relation, case.num_frames, backend=BACKEND,
                                 process_group=group)


def _rank(rank: int, world: int, tmp: str, case: Case, sizes: List[int], args: argparse.Namespace) -> None:
    """One rank: agreement with the one-process result, then timed steps until rank 0 says stop."""
    torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    student, teacher = registry.make_inputs(case, torch.device("cpu"), args.seed)
    whole = student.detach().clone().requires_grad_(student.requires_grad)
    single_loss = registry.make_step(_loss(case), whole, teacher, case.mode)()
    mine = student.detach()[:, lo:hi].clone().requires_grad_(student.requires_grad)
    step = registry.make_step(_loss(case, dist.group.WORLD), mine, teacher[:, lo:hi].clone(), case.mode)
    for _ in range(WARMUP_STEPS):
        loss = step()
    grad_diff = (mine.grad - whole.grad[:, lo:hi]).abs().max().item() if mine.grad is not None else None
    times, go = [], torch.ones(1)
    t_start = time.perf_counter()
    while go.item():
        dist.barrier()
        times.append(measure.time_ms(step, torch.device("cpu")))
        spent = time.perf_counter() - t_start
        done = len(times) >= args.max_reps or (len(times) >= args.min_reps and spent >= args.min_time) \
            or (len(times) >= 3 and spent >= args.max_time)
        go.fill_(0.0 if done else 1.0)
        dist.broadcast(go, src=0)  # every rank runs as many steps as rank 0
    out = dict(rank=rank, tokens=hi - lo, loss=float(loss), loss_max_abs_diff=abs(float(loss) - float(single_loss)),
               grad_max_abs_diff=grad_diff, **measure.summarize_ms(times))
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def run_group(case: Case, sizes: List[int], args: argparse.Namespace, env: Dict) -> List[Dict]:
    """The one-process time, then ``len(sizes)`` gloo ranks on ``case``; one record per rank."""
    world = len(sizes)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads_per_rank)
    student, teacher = registry.make_inputs(case, torch.device("cpu"), args.seed)
    single = registry.make_step(_loss(case), student, teacher, case.mode)
    single()
    single_ms = measure.summarize_ms(measure.time_round_robin({"single": single}, torch.device("cpu"), args.min_reps,
                                                              args.max_reps, args.min_time, args.max_time)["single"])
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="vrepa-sp-") as tmp:
        mp.spawn(_rank, args=(world, tmp, case, sizes, args), nprocs=world, join=True)
        raw = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    shares, volumes = pair_shares(case, world), analytic_bytes(case, sizes)
    return [dict(kind="sequence-parallel", impl=f"{BACKEND} sp", device="cpu", status="ok", **case.as_record(), **env,
                 world_size=world, shard_sizes=list(sizes), threads_per_rank=args.threads_per_rank, **out,
                 pair_share=shares[out["rank"]], **{f"analytic_{k}": v for k, v in volumes.items()},
                 single_time_ms_median=single_ms["time_ms_median"],
                 speedup_vs_single=single_ms["time_ms_median"] / out["time_ms_median"]) for out in raw]


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.4g} MiB" if n >= 2 ** 14 else f"{n:.0f} B"


def markdown(records: List[Dict], command: str) -> str:
    env = records[0]
    lines = [
        f"# Sequence-parallel TRD on CPU (gloo): {env['device_name'].rsplit(' (', 1)[0]}", "",
        f"- date: {env['timestamp']}; commit: `{env['git_commit']}`; torch {env['torch_version']}; "
        f"{CORES} cores", f"- command: `{command}`",
        f"- backend `{BACKEND}`, {env['threads_per_rank']} torch thread(s) per process (ranks and the 1-process "
        f"time alike); median and IQR of steps after {WARMUP_STEPS} warm-up steps, each after a barrier",
        "- bytes per step, from vrepa_kernels.distributed's docstring: gathered W·B·max(N_r)·(Ds+Dt) elements, "
        "all-reduced B·(1 + N·Ds) fp32 (student gradient only); ring: (W−1)/W of the gathered plus 2(W−1)/W "
        "of the all-reduced bytes", "",
        "| case | W | rank | tokens | pair share | median ms | IQR ms | 1-proc ms | 1-proc / rank | gathered "
        "| all-reduced | ring sent | loss diff | grad diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    last = None
    for r in records:
        key = (report.case_key(r), r["world_size"], tuple(r["shard_sizes"]))
        diff = lambda v: "–" if v is None else f"{v:.1e}"
        lines.append("| " + " | ".join([
            f"{report.case_title(r)}, slices {r['shard_sizes']}" if key != last else "", str(r["world_size"]),
            str(r["rank"]), str(r["tokens"]), f"{100 * r['pair_share']:.1f}%", f"{r['time_ms_median']:.4g}",
            f"{r['time_ms_p75'] - r['time_ms_p25']:.2g}", f"{r['single_time_ms_median']:.4g}",
            f"{r['speedup_vs_single']:.2f}×", _mib(r["analytic_gathered_bytes"]),
            _mib(r["analytic_allreduced_bytes"]), _mib(r["analytic_ring_wire_bytes"]),
            diff(r["loss_max_abs_diff"]), diff(r["grad_max_abs_diff"])]) + " |")
        last = key
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.n:
        raise SystemExit("sequence_parallel: --n is required")
    try:
        groups = [(case, shard_sizes(case.n, w, args.shards))
                  for case in custom_cases(args, "sequence-parallel") for w in args.world_size]
    except ValueError as err:
        raise SystemExit(f"sequence_parallel: {err}") from None
    env = measure.environment(torch.device("cpu"))
    records = []
    for case, sizes in groups:
        print(f"[sequence-parallel] {case.describe()} W={len(sizes)} slices {sizes}", file=sys.stderr, flush=True)
        records += run_group(case, sizes, args, env)
    out_dir = args.out or RESULTS_DIR / f"cpu-{env['date']}" / "sequence_parallel"
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in argv)
    report.write(out_dir, records, markdown(records, command), stem="sequence_parallel")
    return records


if __name__ == "__main__":
    main()
