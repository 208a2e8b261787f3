"""Benchmark CLI: times the TRD loss implementations against each other and against the GEMM limit.

    python benchmarks/run.py --quick                      # ~2 min on a 2-core CPU; what `make demo` runs
    python benchmarks/run.py --gpu                        # the full GPU sweep (under ~6 min on an H100)
    python benchmarks/run.py --preset cpu --out DIR       # the full CPU sweep
    python benchmarks/run.py --n 1024 4096 --d 256 --dtype fp32 --mode fwd fwd+bwd --impls naive torch
    python benchmarks/run.py --world-size 2 4 --n 4096 --relation full temporal --frames 16   # sequence parallel

Writes results.json, results.md and time/memory plots to --out (default benchmarks/results/<device>-<date>)
and prints the table. See benchmarks/README.md for what is measured.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import impls as registry  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402
from cases import DTYPES, MODES, PRESETS, Case, attention_flops, useful_flops  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety
    def tqdm(iterable, **kwargs):
        return iterable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GEMM_PROBE_MAX_M = {"cpu": 4096, "cuda": 16384}  # the probe GEMM is [M, Ds+Dt] @ [Ds+Dt, M], M = min(N, this)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=[],
                   help="named shape sets (several allowed)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--gpu", action="store_true", help="same as --preset gpu --device cuda")
    p.add_argument("--n", type=int, nargs="+", help="custom case: token counts N")
    p.add_argument("--d", type=int, default=256, help="custom case: feature dim (student and teacher)")
    p.add_argument("--ds", type=int, help="custom case: student dim (default --d)")
    p.add_argument("--dt", type=int, help="custom case: teacher dim (default --d)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=1, help="custom case: frames per sample (must divide N)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32"])
    p.add_argument("--mode", nargs="+", choices=MODES, default=["fwd+bwd"])
    p.add_argument("--relation", nargs="+", choices=("full", "spatial", "temporal"), default=["full"])
    p.add_argument("--impls", nargs="+", help=f"subset of {', '.join(registry.REGISTRY)} (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<device>-<date>)")
    measure.add_repeat_args(p, "timed rounds per case")
    p.add_argument("--mem-budget-gb", type=float,
                   help="CPU: refuse materialising shapes needing more (default: half the RAM)")
    p.add_argument("--time-budget", type=float,
                   help="seconds after which remaining cases are recorded as skipped (default: 330 for --gpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--world-size", type=int, nargs="+",
                   help="instead of the sweep, simulate sequence parallelism over this many gloo CPU processes "
                        "(benchmarks/sequence_parallel.py; see its --help for the options it takes)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset.append("quick")
    if args.gpu:
        args.preset.append("gpu")
        args.device = args.device or "cuda"
        if args.time_budget is None:
            args.time_budget = 330.0
    if not args.preset and not args.n:
        p.error("name a preset (--quick, --gpu, --preset ...) or a custom case (--n ...)")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda (or --gpu) needs a CUDA device, and torch sees none")
    return args


def select_cases(args: argparse.Namespace) -> List[Case]:
    cases: List[Case] = []
    for name in args.preset:
        cases += PRESETS[name](args.device)
    for n in args.n or []:
        if n % args.frames:
            raise ValueError(f"--frames {args.frames} must divide every --n, got N={n}")
        base = Case(batch=args.batch, frames=args.frames, tokens_per_frame=n // args.frames,
                    ds=args.ds or args.d, dt=args.dt or args.d, label="custom")
        cases += [replace(base, dtype=d, mode=m, relation=r)
                  for d in args.dtype for m in args.mode for r in args.relation]
    if not cases:
        raise ValueError(f"the chosen presets {args.preset} hold no case for device {args.device}")
    return list(dict.fromkeys(cases))  # drop duplicates, keep order


# ---------------------------------------------------------------------------------------------- one case
def _skip(reason: str, status: str = "skipped") -> Dict:
    return dict(status=status, reason=reason)


def run_case(case: Case, impls: List[registry.Impl], device: torch.device, args: argparse.Namespace,
             env: Dict) -> List[Dict]:
    """Measure every implementation on one case; return one record per implementation plus the limit."""
    student, teacher = registry.make_inputs(case, device, args.seed)
    outcome: Dict[str, Dict] = {}
    steps, losses, first_call_s = {}, {}, {}
    for impl in impls:
        try:
            loss_fn = impl.build(case, device)
        except registry.Unavailable as why:
            outcome[impl.name] = _skip(str(why))
            continue
        if impl.quadratic_memory and device.type == "cpu":
            need = registry.quadratic_footprint_bytes(case) / 2 ** 30
            if need > args.mem_budget_gb:
                outcome[impl.name] = _skip(f"would need ~{need:.1f} GiB (> the {args.mem_budget_gb:.1f} GiB budget)")
                continue
        step = registry.make_step(loss_fn, student, teacher, case.mode)
        try:
            t0 = time.perf_counter()
            step()  # first call: compiles / autotunes where the implementation does
            measure.synchronize(device)
            first_call_s[impl.name] = time.perf_counter() - t0
            losses[impl.name] = float(step())  # warm
            steps[impl.name] = step
        except Exception as err:  # noqa: BLE001 - recorded, never raised
            outcome[impl.name] = _failure(impl, err)
            measure.release_memory(device)

    probe_m, probe_k = min(case.n, GEMM_PROBE_MAX_M[device.type]), case.ds + case.dt
    try:
        probe_step, probe_flops = measure.gemm_probe(probe_m, probe_k, case.torch_dtype, device)
        probe_step()
        steps["limit"] = probe_step
    except Exception as err:  # noqa: BLE001 - e.g. OOM; the case is still timed, without a limit
        outcome["limit"] = _failure(None, err)

    def on_error(name, err):
        outcome[name] = _failure(registry.REGISTRY.get(name), err)
        steps.pop(name, None)

    samples, foreign, attempts = _timed_rounds(steps, device, args, on_error)
    probe_ms = samples.pop("limit", None)
    flops = useful_flops(case)
    mm_tflops = None
    if probe_ms and "limit" in steps:
        mm_tflops = probe_flops / (statistics.median(probe_ms) * 1e-3) / 1e12
        # The limit's own spread is the probe's, scaled from the probe's FLOPs to the case's.
        outcome["limit"] = dict(status="ok", reason=f"torch.mm [{probe_m}x{probe_k}] @ [{probe_k}x{probe_m}]",
                                **measure.summarize_ms([t * flops / probe_flops for t in probe_ms]))

    for name, times in samples.items():
        if name not in steps or not times:
            continue
        student.grad = None
        try:
            peak = measure.peak_memory_mb(steps[name], device)
        except Exception as err:  # noqa: BLE001
            outcome[name] = _failure(registry.REGISTRY[name], err)
            continue
        rec = dict(status="ok", reason="", peak_mem_mb=peak, first_call_s=first_call_s[name], loss=losses[name])
        rec.update(measure.summarize_ms(times))
        outcome[name] = rec
    student.grad = None

    default = registry.default_backend(case, student, teacher)
    grad_mb = case.batch * case.n * case.ds * student.element_size() / 2 ** 20 if case.mode == "fwd+bwd" else 0.0
    naive = outcome.get("naive", {})
    records = []
    for name in [impl.name for impl in impls] + ["limit"]:
        impl = registry.REGISTRY.get(name)
        rec = dict(impl=name, kind=impl.kind if impl else "limit", device=device.type, **case.as_record(), **env,
                   is_default=(name == default), default_backend=default, useful_gflop=flops / 1e9,
                   mm_tflops=mm_tflops, grad_mb=grad_mb, foreign_cpu_cores=foreign,
                   timing_attempts=attempts, time_ms_median=None, peak_mem_mb=None)
        rec.update(outcome[name])
        if rec["status"] == "ok":
            _derive(rec, case, naive, mm_tflops, grad_mb)
        records.append(rec)
    return records


def _timed_rounds(steps, device, args, on_error):
    """Round-robin timings; on CPU, re-timed (up to --retries times) while other processes kept more than
    --max-foreign-load cores busy. Keeps the least disturbed attempt and says how disturbed it was."""
    best = None
    for attempt in range(1, 2 + (args.retries if device.type == "cpu" else 0)):
        meter = measure.ForeignCpuMeter()
        meter.start()
        samples = measure.time_round_robin(dict(steps), device, args.min_reps, args.max_reps, args.min_time,
                                           args.max_time, on_error=on_error)
        foreign = meter.stop()
        if best is None or (foreign is not None and foreign < best[1]):
            best = (samples, foreign, attempt)
        if foreign is None or foreign <= args.max_foreign_load:
            break
        time.sleep(args.retry_wait)
    return best


def _failure(impl: Optional[registry.Impl], err: BaseException) -> Dict:
    if measure.is_oom(err):
        return _skip(f"out of memory: {str(err).splitlines()[0][:160]}", status="oom")
    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
    if impl is not None and impl.name == "compiled":
        return _skip(f"torch.compile failed: {text}")
    print(f"\n[bench] {impl.name if impl else '?'} raised {text}", file=sys.stderr)
    return _skip(text, status="error")


def _derive(rec: Dict, case: Case, naive: Dict, mm_tflops: float, grad_mb: float) -> None:
    """Throughput, ratio to the limit, speed-up and loss agreement of one successful record."""
    median = rec["time_ms_median"]
    flops = attention_flops(case) if rec["kind"] == "attention" else useful_flops(case)
    rec.update(tflops=flops / (median * 1e-3) / 1e12, rel_iqr=(rec["time_ms_p75"] - rec["time_ms_p25"]) / median)
    if mm_tflops:
        limit_ms = flops / (mm_tflops * 1e12) * 1e3
        rec.update(limit_ms=limit_ms, limit_ratio=median / limit_ms, frac_of_limit=limit_ms / median)
    if rec["peak_mem_mb"] is not None and rec["impl"] != "limit":
        rec["extra_mem_mb"] = rec["peak_mem_mb"] - grad_mb
    if rec["kind"] == "trd" and naive.get("status") == "ok":
        rec["speedup_vs_naive"] = naive["time_ms_median"] / median
        scale = max(abs(naive["loss"]), 1e-30)
        rec["loss_rel_diff_vs_naive"] = abs(rec["loss"] - naive["loss"]) / scale


# ---------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> List[Dict]:
    if any(a == "--world-size" or a.startswith("--world-size=") for a in (sys.argv[1:] if argv is None else argv)):
        import sequence_parallel
        return sequence_parallel.main(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        cases = select_cases(args)
        impls = registry.select(args.impls)
    except ValueError as err:
        raise SystemExit(f"run.py: {err}") from None
    if args.mem_budget_gb is None:
        args.mem_budget_gb = 0.5 * (measure.total_ram_gib() or 16.0)
    env = measure.environment(device)
    out_dir = args.out or RESULTS_DIR / f"{measure.device_slug(device)}-{env['date']}"
    out_dir.mkdir(parents=True, exist_ok=True)

    # Cases that share a torch.compile group run back to back (the compiled peer recompiles per group).
    order = sorted(range(len(cases)), key=lambda i: (cases[i].dtype, cases[i].relation, cases[i].mode))
    by_case: Dict[int, List[Dict]] = {}
    t_start = time.perf_counter()
    bar = tqdm(order, desc="cases", unit="case", disable=args.no_progress, file=sys.stderr)
    for i in bar:
        case = cases[i]
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(case.describe())
        spent = time.perf_counter() - t_start
        if args.time_budget is not None and spent > args.time_budget:
            by_case[i] = [dict(impl=impl.name, kind=impl.kind, device=device.type, **case.as_record(), **env,
                               time_ms_median=None, peak_mem_mb=None, is_default=False,
                               **_skip(f"time budget of {args.time_budget:.0f} s spent"))
                          for impl in impls]
            continue
        try:
            by_case[i] = run_case(case, impls, device, args, env)
        finally:
            measure.release_memory(device)
    records = [rec for i in range(len(cases)) for rec in by_case[i]]

    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    title = f"TRD loss benchmark: {env['device_name']}"
    md = report.markdown(records, title, command, report.targets(records))
    report.write_json(records, out_dir / "results.json")
    (out_dir / "results.md").write_text(md)
    written = [] if args.no_plots else report.plots(records, out_dir)
    print(md)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
          + "".join(f", {p}" for p in written) + f" in {time.perf_counter() - t_start:.0f} s")
    return records


if __name__ == "__main__":
    main()
