"""Benchmark CLI: times the TRD loss implementations against each other and against the GEMM limit.

    python benchmarks/run.py --quick                      # ~2 min on a 2-core CPU; what `make demo` runs
    python benchmarks/run.py --gpu                        # the GPU sweep (estimated 4-5 min on an H100)
    python benchmarks/run.py --preset cpu --out DIR       # the full CPU sweep
    python benchmarks/run.py --n 1024 4096 --d 256 --dtype fp32 --mode fwd fwd+bwd --impls naive torch
    python benchmarks/run.py --world-size 2 4 --n 4096 --relation full temporal --frames 16   # sequence parallel

Writes results.json, results.md and time/memory plots to --out (default benchmarks/results/<device>-<date>)
and prints the table. See benchmarks/README.md for what is measured.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import impls as registry  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402
from cases import PRESETS, Case, add_case_args, custom_cases, useful_flops  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GEMM_PROBE_MAX_M = {"cpu": 4096, "cuda": 16384}  # the probe GEMM is [M, Ds+Dt] @ [Ds+Dt, M], M = min(N, this)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=[], help="named shape sets")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--gpu", action="store_true", help="same as --preset gpu --device cuda --time-budget 330")
    add_case_args(p)
    p.add_argument("--impls", nargs="+", help=f"subset of {', '.join(registry.REGISTRY)} "
                                              "(default: all but the opt-in triton-acqrel)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<device>-<date>)")
    measure.add_repeat_args(p, "timed rounds per case")
    p.add_argument("--retries", type=int, default=0,
                   help="CPU: re-time a case up to this often while other processes keep > 0.25 cores busy")
    p.add_argument("--mem-budget-gb", type=float,
                   help="CPU: refuse materialising shapes needing more (default: half the RAM)")
    p.add_argument("--time-budget", type=float, help="seconds after which remaining cases are recorded as skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no per-case progress lines on stderr")
    args = p.parse_args(argv)
    if args.quick:
        args.preset.append("quick")
    if args.gpu:
        args.preset.append("gpu")
        args.device = args.device or "cuda"
        args.time_budget = 330.0 if args.time_budget is None else args.time_budget
    if not args.preset and not args.n:
        p.error("name a preset (--quick, --gpu, --preset ...) or a custom case (--n ...)")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda (or --gpu) needs a CUDA device, and torch sees none")
    return args


def select_cases(args: argparse.Namespace) -> List[Case]:
    cases = [case for name in args.preset for case in PRESETS[name](args.device)] + custom_cases(args)
    if not cases:
        raise ValueError(f"the chosen presets {args.preset} hold no case for device {args.device}")
    return list(dict.fromkeys(cases))  # drop duplicates, keep order


# ---------------------------------------------------------------------------------------------- one case
def run_case(case: Case, impls: List[registry.Impl], device: torch.device, args: argparse.Namespace):
    """Measure the implementations and the GEMM limit on one case: ``({name: partial record}, the column
    that trd_loss runs by default)``."""
    student, teacher = registry.make_inputs(case, device, args.seed)
    default = registry.default_impl(case, student, teacher)
    outcome: Dict[str, Dict] = {}
    steps = {}
    for impl in impls:
        try:
            step = registry.make_step(impl.build(case, device), student, teacher, case.mode)
            need = registry.quadratic_footprint_bytes(case) / 2 ** 30
            if impl.quadratic_memory and device.type == "cpu" and need > args.mem_budget_gb:
                raise registry.Unavailable(f"would need ~{need:.1f} GiB (> the {args.mem_budget_gb:.1f} GiB budget)")
            t0 = time.perf_counter()
            float(step())  # first call: compiles where the implementation does; float() waits for it
            first_call_s = time.perf_counter() - t0
            outcome[impl.name] = dict(first_call_s=first_call_s, loss=float(step()))
            steps[impl.name] = step
        except Exception as err:  # noqa: BLE001 - recorded, never raised
            outcome[impl.name] = failure(impl.name, err)
            measure.release_memory(device)
    m, k = min(case.n, GEMM_PROBE_MAX_M[device.type]), case.ds + case.dt
    try:
        probe, probe_flops = measure.gemm_probe(m, k, case.torch_dtype, device)
        probe()  # warm-up
        steps["limit"], outcome["limit"] = probe, dict(reason=f"torch.mm [{m}x{k}] @ [{k}x{m}]")
    except Exception as err:  # noqa: BLE001 - e.g. OOM: the case is still timed, without a limit
        outcome["limit"] = failure("limit", err)

    def on_error(name, err):
        outcome[name] = failure(name, err)
        steps.pop(name)

    best = None
    for _ in range(1 + (args.retries if device.type == "cpu" else 0)):
        run = lambda: measure.time_round_robin(dict(steps), device, args.min_reps, args.max_reps, args.min_time,
                                               args.max_time, on_error)
        samples, load = measure.foreign_cpu_cores(run) if device.type == "cpu" else (run(), None)
        if best is None or (load is not None and load < best[1]):
            best = (samples, load)
        if load is None or load <= report.CONTENDED_CORES:
            break
    samples, load = best
    flops = useful_flops(case)
    if samples.get("limit"):  # the probe's times, scaled from the probe's FLOPs to the case's
        samples["limit"] = [t * flops / probe_flops for t in samples["limit"]]
    for name in [n for n in steps if samples.get(n)]:
        rec = outcome[name]
        rec.update(status="ok", foreign_cpu_cores=load, **measure.summarize_ms(samples[name]))
        try:
            student.grad = None
            rec["peak_mem_mb"] = None if name == "limit" else measure.peak_memory_mb(steps[name], device)
        except Exception as err:  # noqa: BLE001
            outcome[name] = failure(name, err)
    student.grad = None
    outcome["limit"].setdefault("status", "error")
    return outcome, default


def failure(name: str, err: BaseException) -> Dict:
    if isinstance(err, registry.Unavailable):
        return dict(status="skipped", reason=str(err))
    if measure.is_oom(err):
        return dict(status="oom", reason=f"out of memory: {str(err).splitlines()[0][:160]}")
    text = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    print(f"[bench] {name} raised {text}", file=sys.stderr)
    return dict(status="error", reason=text)


def case_records(case: Case, outcome: Dict[str, Dict], device: torch.device, default: str, env: Dict) -> List[Dict]:
    """Full records of one case: shape, environment, and throughput, limit ratio, speed-up, agreement."""
    flops = useful_flops(case)
    grad_mb = case.batch * case.n * case.ds * case.torch_dtype.itemsize / 2 ** 20 if case.mode == "fwd+bwd" else 0.0
    limit, naive = outcome.get("limit", {}), outcome.get("naive", {})
    limit_ms = limit.get("time_ms_median")
    records = []
    for name, rec in outcome.items():
        rec = {**dict(impl=name, device=device.type, **case.as_record(), **env, is_default=name == default,
                      default_impl=default, useful_gflop=flops / 1e9, grad_mb=grad_mb, reason="",
                      time_ms_median=None, peak_mem_mb=None), **rec}
        if rec["status"] == "ok":
            t = rec["time_ms_median"]
            rec.update(tflops=flops / (t * 1e-3) / 1e12, rel_iqr=(rec["time_ms_p75"] - rec["time_ms_p25"]) / t)
            if limit_ms:
                rec.update(limit_ms=limit_ms, limit_ratio=t / limit_ms, frac_of_limit=limit_ms / t)
            if rec["peak_mem_mb"] is not None:
                rec["extra_mem_mb"] = rec["peak_mem_mb"] - grad_mb
            if naive.get("status") == "ok" and name != "limit":
                rec["speedup_vs_naive"] = naive["time_ms_median"] / t
                rec["loss_rel_diff_vs_naive"] = abs(rec["loss"] - naive["loss"]) / max(abs(naive["loss"]), 1e-30)
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------- main
# ---------------------------------------------------------------------------------------------- main
def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--world-size" or a.startswith("--world-size=") for a in argv):
        import sequence_parallel
        return sequence_parallel.main(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        cases = select_cases(args)
        plan = [(case, registry.select(args.impls, () if args.impls else case.extra_impls)) for case in cases]
    except ValueError as err:
        raise SystemExit(f"run.py: {err}") from None
    if args.mem_budget_gb is None:
        args.mem_budget_gb = 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    env = measure.environment(device)
    out_dir = args.out or RESULTS_DIR / f"{measure.device_slug(device)}-{env['date']}"
    # Cases that share a torch.compile group run back to back (the compiled peer recompiles per group).
    order = sorted(range(len(plan)), key=lambda i: (plan[i][0].dtype, plan[i][0].relation, plan[i][0].mode))
    by_case: Dict[int, List[Dict]] = {}
    t_start, stop = time.perf_counter(), None
    previous = signal.signal(signal.SIGTERM, _interrupt)  # e.g. `timeout`: report the cases done so far
    for done, i in enumerate(order):
        case, impls = plan[i]
        if not args.no_progress:
            print(f"[bench] {done + 1}/{len(order)} {case.describe()}", file=sys.stderr, flush=True)
        if stop is None and args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
            stop = f"time budget of {args.time_budget:.0f} s spent"
        outcome, default = {impl.name: dict(status="skipped", reason=stop) for impl in impls}, ""
        if stop is None:
            try:
                outcome, default = run_case(case, impls, device, args)
            except KeyboardInterrupt:
                stop = "interrupted (SIGTERM or Ctrl-C)"
                outcome = {impl.name: dict(status="skipped", reason=stop) for impl in impls}
            measure.release_memory(device)
        by_case[i] = case_records(case, outcome, device, default, env)
    signal.signal(signal.SIGTERM, previous)
    records = [rec for i in range(len(plan)) for rec in by_case[i]]
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in argv)
    md = report.markdown(records, f"TRD loss benchmark: {env['device_name']}", command)
    report.write(out_dir, records, md, plots=not args.no_plots)
    print(f"in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
