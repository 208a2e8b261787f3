"""Writing results: results.json (one record per measurement), results.md (tables and target checks) and
PNG plots of time and peak memory against N."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

CASE_KEYS = ("B", "N", "Ds", "Dt", "dtype", "mode", "relation", "F")
SERIES_KEYS = ("B", "Ds", "Dt", "dtype", "mode", "relation")  # what stays fixed along one N-sweep line
FUSED = ("cuda", "triton")


def case_key(rec: Dict) -> Tuple:
    return tuple(rec[k] for k in CASE_KEYS)


def case_title(rec: Dict) -> str:
    dims = f"D={rec['Ds']}" if rec["Ds"] == rec["Dt"] else f"Ds={rec['Ds']} Dt={rec['Dt']}"
    rel = "" if rec["relation"] == "full" else f" {rec['relation']} F={rec['F']}"
    label = f" ({rec['label']})" if rec.get("label") else ""
    return f"B={rec['B']} N={rec['N']} {dims} {rec['dtype']} {rec['mode']}{rel}{label}"


def impl_label(rec: Dict) -> str:
    return rec["impl"] + (" (auto)" if rec.get("is_default") else "")


def write_json(records: List[Dict], path: Path) -> None:
    path.write_text(json.dumps(records, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- markdown
def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def _status_cell(rec: Dict, notes: "OrderedDict[str, int]") -> str:
    if rec["status"] == "ok":
        return _fmt(rec["time_ms_median"], ".3g")
    reason = f"{rec['impl']}: {rec.get('reason') or rec['status']}"
    number = notes.setdefault(reason, len(notes) + 1)
    return f"{rec['status'].upper()} [{number}]"


def never_ran(records: List[Dict]) -> "OrderedDict[str, str]":
    """Implementations skipped in every case, with their (first) reason: listed once, not in the table."""
    skipped: "OrderedDict[str, str]" = OrderedDict()
    for rec in records:
        skipped.setdefault(rec["impl"], rec.get("reason", "") if rec["status"] == "skipped" else None)
        if rec["status"] != "skipped":
            skipped[rec["impl"]] = None
    return OrderedDict((k, v) for k, v in skipped.items() if v is not None)


def table(records: List[Dict]) -> str:
    """One row per (case, implementation); skip/OOM reasons as numbered notes below."""
    notes: "OrderedDict[str, int]" = OrderedDict()
    absent = never_ran(records)
    records = [r for r in records if r["impl"] not in absent]
    lines = ["| case | impl | median ms | IQR ms | peak MiB | TFLOP/s | time / limit | % of limit | speed-up vs naive |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    last = None
    for rec in records:
        key = case_key(rec)
        title = case_title(rec) if key != last else ""
        if title and (rec.get("foreign_cpu_cores") or 0) > CONTENDED_CORES:
            title += f" ⚠ {rec['foreign_cpu_cores']:.1f} cores busy elsewhere"
        last = key
        ok = rec["status"] == "ok"
        iqr = rec["time_ms_p75"] - rec["time_ms_p25"] if ok else None
        lines.append("| " + " | ".join([
            title, impl_label(rec), _status_cell(rec, notes), _fmt(iqr, ".2g"),
            _fmt(rec.get("peak_mem_mb") if ok else None, ".4g"), _fmt(rec.get("tflops") if ok else None, ".3g"),
            _fmt(rec.get("limit_ratio") if ok else None, ".2f", "×"),
            _fmt(100 * rec["frac_of_limit"] if ok and rec.get("frac_of_limit") else None, ".0f", "%"),
            _fmt(rec.get("speedup_vs_naive") if ok else None, ".2f", "×"),
        ]) + " |")
    lines.append("")
    lines += [f"[{n}] {reason}  " for reason, n in notes.items()]
    if absent:
        lines += ["", "Not run here:", ""] + [f"- {impl}: {reason}" for impl, reason in absent.items()]
    return "\n".join(lines)


def noise_summary(records: List[Dict]) -> str:
    spreads = sorted(r["rel_iqr"] for r in records if r["status"] == "ok" and r.get("rel_iqr") is not None
                     and r["impl"] != "limit")
    if not spreads:
        return "no repeated timings"
    median = spreads[len(spreads) // 2]
    return (f"relative IQR (p75 - p25) / median over {len(spreads)} measurements: median {100 * median:.0f}%, "
            f"worst {100 * spreads[-1]:.0f}%")


CONTENDED_CORES = 0.25  # other processes' CPU use above which a CPU case is flagged


def load_summary(records: List[Dict]) -> str:
    """How much other processes used the CPU while cases were timed (a shared machine skews CPU timings)."""
    per_case = {case_key(r): r.get("foreign_cpu_cores") for r in records if r["device"] == "cpu"}
    values = sorted(v for v in per_case.values() if v is not None)
    if not values:
        return "other processes' CPU use: not measured (GPU run, or no /proc/stat)"
    flagged = sum(v > CONTENDED_CORES for v in values)
    return (f"other processes' CPU use while cases were timed: median {values[len(values) // 2]:.2f}, "
            f"max {values[-1]:.2f} of {os.cpu_count()} cores; {flagged} of {len(values)} cases stayed above "
            f"{CONTENDED_CORES} cores after re-timing and are marked ⚠ (their times are inflated)")


def markdown(records: List[Dict], title: str, command: str, targets: List[str]) -> str:
    env = records[0]
    lines = [
        f"# {title}", "",
        f"- device: **{env['device_name']}** ({env['device']})",
        f"- date: {env['timestamp']}; commit: `{env['git_commit']}`",
        f"- torch {env['torch_version']}, triton {env['triton_version']}, CUDA {env['cuda_version']}, "
        f"Python {env['python_version']}",
        f"- command: `{command}`",
        f"- timing: median of round-robin repeats after warm-up; {noise_summary(records)}",
        f"- {load_summary(records)}",
        "- limit: time torch.mm on this device needs for the useful FLOPs, measured in the same rounds "
        "(see benchmarks/README.md); `(auto)` marks the backend `trd_loss` picks by default", "",
    ]
    if targets:
        lines += ["## Targets", ""] + [f"- {t}" for t in targets] + [""]
    lines += ["## Results", "", table(records)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- targets
def _find(records: Iterable[Dict], **want) -> List[Dict]:
    return [r for r in records if all(r.get(k) == v for k, v in want.items())]


def _at_least(name: str, value: float, goal: float, unit: str = "×") -> str:
    verdict = "met" if value >= goal else f"MISSED by {100 * (1 - value / goal):.0f}%"
    return f"{name} {value:.2f}{unit} (target ≥ {goal:g}{unit}: {verdict})"


def _at_most(name: str, value: float, goal: float, unit: str = "×") -> str:
    verdict = "met" if value <= goal else f"MISSED by {100 * (value / goal - 1):.0f}%"
    return f"{name} {value:.2f}{unit} (target ≤ {goal:g}{unit}: {verdict})"


def _of_limit(rec: Dict) -> str:
    frac = rec.get("frac_of_limit")
    return "of limit: not measured" if frac is None else _at_least("of limit", 100 * frac, 65, "%")


def _time(recs: List[Dict], impl: str) -> Optional[float]:
    found = [r for r in recs if r["impl"] == impl and r["status"] == "ok"]
    return found[0]["time_ms_median"] if found else None


def targets(records: List[Dict]) -> List[str]:
    """The issue's targets, checked on whichever of their cases this run measured; misses say by how much."""
    out = []
    cpu = _find(records, device="cpu", dtype="fp32", B=1, N=4096, Ds=256, Dt=256, mode="fwd+bwd", relation="full")
    default = [r for r in cpu if r.get("is_default") and r["status"] == "ok"]
    if default and _time(cpu, "naive") and _time(cpu, "limit"):
        d = default[0]
        out.append(f"CPU fp32 N=4096 D=256 fwd+bwd, default backend ({d['impl']}): "
                   + _at_least("speed-up vs naive", _time(cpu, "naive") / d["time_ms_median"], 3) + "; "
                   + _at_most("time / limit", d["time_ms_median"] / _time(cpu, "limit"), 1.3))
    gpu = _find(records, device="cuda", dtype="bf16", B=1, N=17550, Ds=768, Dt=768, mode="fwd+bwd", relation="full")
    fused = [r for r in gpu if r["impl"] in FUSED and r["status"] == "ok"]
    if fused:
        best = min(fused, key=lambda r: r["time_ms_median"])
        parts = []
        for peer, goal in (("naive", 8), ("compiled", 4)):
            peer_time = _time(gpu, peer)
            parts.append(_at_least(f"vs {peer}", peer_time / best["time_ms_median"], goal) if peer_time
                         else f"vs {peer}: {peer} did not run")
        parts.append(_of_limit(best))
        if best.get("extra_mem_mb") is not None:
            parts.append(_at_most("peak memory beyond the gradient", best["extra_mem_mb"], 64, " MiB"))
        out.append(f"H100 target, bf16 N=17550 D=768 fwd+bwd, best fused ({best['impl']}): " + "; ".join(parts))
    big = _find(records, device="cuda", B=1, N=75600, Ds=768, Dt=768, mode="fwd+bwd", relation="full")
    fused = [r for r in big if r["impl"] in FUSED and r["status"] == "ok"]
    if big:
        naive = _find(big, impl="naive")
        naive_state = naive[0]["status"] if naive else "not run"
        if fused:
            best = min(fused, key=lambda r: r["time_ms_median"])
            out.append(f"N=75600 fwd+bwd, best fused ({best['impl']}): "
                       + _at_most("time", best["time_ms_median"], 40, " ms") + f"; naive: {naive_state}")
        else:
            out.append("N=75600 fwd+bwd: no fused backend completed (target < 40 ms: MISSED)")
    for rec in _find(records, device="cuda", impl="cuda", dtype="bf16", Ds=768, Dt=768, mode="fwd+bwd",
                     relation="full", status="ok"):
        if rec["N"] < 8192:
            continue
        same = [r for r in records if case_key(r) == case_key(rec)]
        triton_time = _time(same, "triton")
        parts = [_of_limit(rec)]
        if triton_time:
            parts.insert(0, _at_least("speed vs triton", triton_time / rec["time_ms_median"], 1))
        out.append(f"CUDA backend, bf16 N={rec['N']} D=768 fwd+bwd: " + "; ".join(parts))
    return out


# ---------------------------------------------------------------------------------------------- plots
def plots(records: List[Dict], out_dir: Path) -> List[Path]:
    """time_vs_n.png and memory_vs_n.png: one panel per N-sweep (>= 2 sizes), one line per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: "OrderedDict[Tuple, List[Dict]]" = OrderedDict()
    for rec in records:
        series.setdefault(tuple(rec[k] for k in SERIES_KEYS), []).append(rec)
    sweeps = [(key, recs) for key, recs in series.items() if len({r["N"] for r in recs}) >= 2]
    if not sweeps:
        return []
    written = []
    for metric, ylabel, fname in (("time_ms_median", "median time (ms)", "time_vs_n.png"),
                                  ("peak_mem_mb", "peak memory growth (MiB)", "memory_vs_n.png")):
        fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4.2), squeeze=False)
        for ax, (key, recs) in zip(axes[0], sweeps):
            impls = list(OrderedDict.fromkeys(r["impl"] for r in recs))
            for impl in impls:
                pts = sorted((r["N"], r[metric]) for r in recs
                             if r["impl"] == impl and r["status"] == "ok" and r.get(metric))
                if not pts:
                    continue
                style = dict(color="black", linestyle="--") if impl == "limit" else dict(marker="o")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=impl, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens per sample)")
            ax.set_ylabel(ylabel)
            ax.set_title(" ".join(f"{k}={v}" for k, v in zip(SERIES_KEYS, key)), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(f"{records[0]['device_name']} · {records[0]['date']} · {records[0]['git_commit']}", fontsize=9)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
