"""Measure the Triton backend's tile configs on this GPU (both passes of the two-pass path, both schedules of
the memory-minimal path); optionally pin the fastest.

    python benchmarks/tune_triton.py                 # print the table (bf16, N = 17,550, D = 768)
    python benchmarks/tune_triton.py --write         # also record the winners in
                                                     # vrepa_kernels/backends/triton_configs.json

Every candidate is first checked against the default config's result (loss and gradient), so a config
that compiles but computes wrong values is never pinned. Timing: CUDA events, median of repeats after
warm-up, one loss + student gradient pass (teacher frozen), as in training.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from vrepa_kernels.backends import triton_backend  # noqa: E402
from vrepa_kernels.features import Features  # noqa: E402
from vrepa_kernels.relation import RelationSpec  # noqa: E402

import measure  # noqa: E402

TILES = {True: [(64, 64), (128, 128)], False: [(64, 64), (64, 128), (128, 64), (128, 128), (64, 256)]}


def candidates(symmetric: bool, quick: bool = False):
    """About 16 symmetric and 40 row-owned configs: a few minutes per dtype on an H100 (quick: the default)."""
    if quick:
        yield triton_backend.default_config(torch.bfloat16, symmetric)
        return
    for (bm, bn), bd, warps, stages in itertools.product(TILES[symmetric], (32, 64), (4, 8), (2, 3)):
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, BLOCK_D=bd, num_warps=warps, num_stages=stages)


def two_pass_candidates(quick: bool = False):
    """Relation-pass and gradient-pass configs (the pair tile is the 128 x 128 map tile)."""
    if quick:  # about a minute with compiles: what gpu_check.sh affords
        return ([dict(BLOCK_K=64, num_warps=8, num_stages=st) for st in (2, 3, 4)],
                [dict(BLOCK_N=bn, BLOCK_D=bd, num_warps=8, num_stages=3) for bn in (64, 128) for bd in (64, 128, 256)])
    relation = [dict(BLOCK_K=k, num_warps=8, num_stages=st) for k, st in itertools.product((32, 64), (2, 3, 4))]
    gradient = [dict(BLOCK_N=bn, BLOCK_D=bd, num_warps=w, num_stages=st)
                for bn, bd, w, st in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 3))]
    return relation, gradient


def time_ms(fn, reps: int) -> float:
    """Median of ``reps`` calls after one warm-up, on the benchmarks' one timer."""
    fn()
    return statistics.median(measure.time_ms(fn, torch.device("cuda")) for _ in range(reps))


def tune(dtype: torch.dtype, n: int, d: int, reps: int, quick: bool = False):
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(1, n, d, device="cuda", dtype=dtype, generator=gen)
    t = (s.float() + torch.randn(1, n, d, device="cuda", generator=gen)).to(dtype)
    feats_s, feats_t = Features.of(s), Features.of(t)
    spec = RelationSpec(1, n, "full")
    results = {"two_pass": tune_two_pass(dtype, feats_s, feats_t, spec, reps, quick)}
    for schedule, symmetric in (("symmetric", True), ("row_owned", False)):
        run = lambda cfg: triton_backend.pair_sums(feats_s, feats_t, spec, True, False, not symmetric,
                                                   algorithm="memory_minimal", config=cfg)
        base_sums, base_grad, _ = run(triton_backend.kernel_config(dtype, s.device, symmetric))
        rows = []
        for cfg in candidates(symmetric, quick):
            try:
                sums, grad, _ = run(cfg)
                ok = (torch.allclose(sums, base_sums, rtol=1e-4)
                      and torch.allclose(grad, base_grad, rtol=1e-3, atol=1e-3 * base_grad.abs().max().item()))
                ms = time_ms(lambda: run(cfg), reps) if ok else float("nan")
            except Exception as exc:  # out of resources, compile errors: record and go on
                ok, ms = False, float("nan")
                cfg = dict(cfg, error=type(exc).__name__)
            rows.append((ms, ok, cfg))
            print(f"{schedule:9s} {'ok ' if ok else 'BAD'} {ms:9.2f} ms  {cfg}", flush=True)
        good = sorted((r for r in rows if r[1]), key=lambda r: r[0])
        results[schedule] = good[0] if good else None
    return results


def tune_two_pass(dtype, feats_s, feats_t, spec, reps, quick=False):
    """The fastest relation-pass config (map written), then the fastest gradient-pass config on that map."""
    default = triton_backend.two_pass_config(dtype, feats_s.values.device)
    base_sums, base_map = triton_backend.relation_pass(feats_s, feats_t, spec, config=default["relation"])
    base_grad = triton_backend.gradient_pass(feats_s, base_map, config=default["gradient"])
    relation, gradient = two_pass_candidates(quick)
    best, total = {}, 0.0
    for part, configs in (("relation", relation), ("gradient", gradient)):
        rows = []
        for cfg in configs:
            try:
                if part == "relation":
                    run = lambda: triton_backend.relation_pass(feats_s, feats_t, spec, config=cfg)
                    sums, words = run()
                    ok = torch.allclose(sums, base_sums, rtol=1e-4) and torch.equal(words, base_map)
                else:
                    run = lambda: triton_backend.gradient_pass(feats_s, base_map, config=cfg)
                    ok = torch.allclose(run(), base_grad, rtol=1e-3, atol=1e-3 * base_grad.abs().max().item())
                ms = time_ms(run, reps) if ok else float("nan")
            except Exception as exc:  # out of resources, compile errors: record and go on
                ok, ms, cfg = False, float("nan"), dict(cfg, error=type(exc).__name__)
            rows.append((ms, ok, cfg))
            print(f"two_pass {part:8s} {'ok ' if ok else 'BAD'} {ms:9.2f} ms  {cfg}", flush=True)
        good = sorted((r for r in rows if r[1]), key=lambda r: r[0])
        if not good:
            return None
        best[part] = good[0][2]
        total += good[0][0]
    return total, True, best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=17_550)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=("bfloat16", "float16", "float32"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--write", action="store_true", help="pin the winners in triton_configs.json")
    p.add_argument("--quick", action="store_true", help="a few two-pass configs, the memory-minimal defaults")
    p.add_argument("--copy-to", type=Path, help="also write the resulting table here (gpu_check.sh)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_triton.py needs a CUDA device")
    device = torch.cuda.get_device_name()
    table = json.loads(triton_backend.TUNED_CONFIGS.read_text()) if triton_backend.TUNED_CONFIGS.exists() else {}
    for name in args.dtype:
        best = tune(getattr(torch, name), args.n, args.d, args.reps, args.quick)
        entry = {k: v[2] for k, v in best.items() if v}
        if "symmetric" in entry and "row_owned" in entry:
            entry["fastest"] = min(("symmetric", "row_owned"), key=lambda k: best[k][0])
        entry["measured"] = {k: round(v[0], 3) for k, v in best.items() if v}
        minimal = [entry["measured"][k] for k in ("symmetric", "row_owned") if k in entry["measured"]]
        if "two_pass" in entry["measured"] and minimal:  # what algorithm="auto" picks on this GPU
            faster = entry["measured"]["two_pass"] <= min(minimal)
            entry["fastest_algorithm"] = "two_pass" if faster else "memory_minimal"
        entry["shape"] = f"N={args.n} D={args.d}, loss + student gradient"
        print(f"== {device} {name}: {json.dumps(entry)}")
        table.setdefault(device, {})[name] = entry
    if args.write:
        triton_backend.TUNED_CONFIGS.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        print(f"wrote {triton_backend.TUNED_CONFIGS}")
    if args.copy_to:
        args.copy_to.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
