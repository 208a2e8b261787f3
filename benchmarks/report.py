"""The one report path: :func:`write` saves the records (``<stem>.json``), the markdown (``<stem>.md``) and,
on request, PNG plots of time and peak memory against N."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

CASE_KEYS = ("B", "N", "Ds", "Dt", "dtype", "mode", "relation", "F")
SERIES_KEYS = ("B", "Ds", "Dt", "dtype", "mode", "relation")  # what stays fixed along one N-sweep line
FUSED = ("triton", "triton-minimal", "cuda", "cuda-minimal")  # the library's GPU kernels
CONTENDED_CORES = 0.25  # other processes' CPU use above which a CPU case is flagged


def write(out_dir: Path, records: List[Dict], md: str, stem: str = "results", plots: bool = False) -> List[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` (and plots) to ``out_dir``, print the markdown, return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(records, indent=1, default=str) + "\n")
    paths[1].write_text(md)
    paths += plot(records, out_dir) if plots else []
    print(md + "\nwrote " + ", ".join(map(str, paths)))
    return paths


def case_key(rec: Dict) -> Tuple:
    return tuple(rec[k] for k in CASE_KEYS)


def case_title(rec: Dict) -> str:
    dims = f"D={rec['Ds']}" if rec["Ds"] == rec["Dt"] else f"Ds={rec['Ds']} Dt={rec['Dt']}"
    rel = "" if rec["relation"] == "full" else f" {rec['relation']} F={rec['F']}"
    label = f" ({rec['label']})" if rec.get("label") else ""
    return f"B={rec['B']} N={rec['N']} {dims} {rec['dtype']} {rec['mode']}{rel}{label}"


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


# ---------------------------------------------------------------------------------------------- markdown
def table(records: List[Dict]) -> str:
    """One row per (case, implementation); skip/OOM reasons as numbered notes below; implementations
    skipped in every case listed once."""
    absent: "OrderedDict[str, Optional[str]]" = OrderedDict()
    for rec in records:
        skipped = rec["status"] == "skipped" and absent.get(rec["impl"], "") is not None
        absent[rec["impl"]] = rec.get("reason", "") if skipped else None
    absent = OrderedDict((k, v) for k, v in absent.items() if v is not None)
    notes: "OrderedDict[str, int]" = OrderedDict()
    lines = ["| case | impl | median ms | IQR ms | peak MiB | TFLOP/s | time / limit | % of limit "
             "| speed-up vs naive |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    last = None
    for rec in (r for r in records if r["impl"] not in absent):
        title = case_title(rec) if case_key(rec) != last else ""
        if title and (rec.get("foreign_cpu_cores") or 0) > CONTENDED_CORES:
            title += f" ⚠ {rec['foreign_cpu_cores']:.1f} cores busy elsewhere"
        last = case_key(rec)
        ok = rec["status"] == "ok"
        if ok:
            time_cell = _fmt(rec["time_ms_median"], ".3g")
        else:
            number = notes.setdefault(f"{rec['impl']}: {rec.get('reason') or rec['status']}", len(notes) + 1)
            time_cell = f"{rec['status'].upper()} [{number}]"
        get = lambda key: rec.get(key) if ok else None
        lines.append("| " + " | ".join([
            title, rec["impl"] + (" (auto)" if rec.get("is_default") else ""), time_cell,
            _fmt(rec["time_ms_p75"] - rec["time_ms_p25"] if ok else None, ".2g"),
            _fmt(get("peak_mem_mb"), ".4g"), _fmt(get("tflops"), ".3g"), _fmt(get("limit_ratio"), ".2f", "×"),
            _fmt(100 * get("frac_of_limit") if get("frac_of_limit") else None, ".0f", "%"),
            _fmt(get("speedup_vs_naive"), ".2f", "×")]) + " |")
    lines += [""] + [f"[{n}] {reason}  " for reason, n in notes.items()]
    if absent:
        lines += ["", "Not run here:", ""] + [f"- {impl}: {reason}" for impl, reason in absent.items()]
    return "\n".join(lines)


def markdown(records: List[Dict], title: str, command: str) -> str:
    env = records[0]
    spreads = sorted(r["rel_iqr"] for r in records if r.get("rel_iqr") is not None and r["impl"] != "limit")
    noise = (f"relative IQR (p75 - p25) / median over {len(spreads)} measurements: median "
             f"{100 * spreads[len(spreads) // 2]:.0f}%, worst {100 * spreads[-1]:.0f}%") if spreads else "no repeats"
    load = sorted({case_key(r): r["foreign_cpu_cores"] for r in records
                   if r.get("foreign_cpu_cores") is not None}.values())
    lines = [
        f"# {title}", "",
        f"- device: **{env['device_name']}** ({env['device']})",
        f"- date: {env['timestamp']}; commit: `{env['git_commit']}`",
        f"- torch {env['torch_version']}, triton {env['triton_version']}, CUDA {env['cuda_version']}, "
        f"Python {env['python_version']}",
        f"- command: `{command}`",
        f"- timing: median of round-robin repeats after warm-up; {noise}",
    ]
    if load:
        lines.append(f"- other processes' CPU use while cases were timed: median {load[len(load) // 2]:.2f}, max "
                     f"{load[-1]:.2f} of {os.cpu_count()} cores; cases above {CONTENDED_CORES} are marked ⚠")
    lines += ["- limit: time torch.mm on this device needs for the useful FLOPs, measured in the same rounds "
              "(see benchmarks/README.md); `(auto)` marks what `trd_loss` runs by default", ""]
    found = targets(records)
    if found:
        lines += ["## Targets", ""] + [f"- {t}" for t in found] + [""]
    return "\n".join(lines + ["## Results", "", table(records)]) + "\n"


# ---------------------------------------------------------------------------------------------- targets
def _find(records: Iterable[Dict], **want) -> List[Dict]:
    return [r for r in records if all(r.get(k) == v for k, v in want.items())]


def _check(name: str, value: float, goal: float, unit: str = "×", at_least: bool = True) -> str:
    met = value >= goal if at_least else value <= goal
    miss = 1 - value / goal if at_least else value / goal - 1
    verdict = "met" if met else f"MISSED by {100 * miss:.0f}%"
    return f"{name} {value:.2f}{unit} (target {'≥' if at_least else '≤'} {goal:g}{unit}: {verdict})"


def _time(recs: List[Dict], impl: str) -> Optional[float]:
    found = [r for r in recs if r["impl"] == impl and r["status"] == "ok"]
    return found[0]["time_ms_median"] if found else None


def targets(records: List[Dict]) -> List[str]:
    """The issues' targets, checked on whichever of their cases this run measured; misses say by how much."""
    out = []
    cpu = _find(records, device="cpu", dtype="fp32", B=1, N=4096, Ds=256, Dt=256, mode="fwd+bwd", relation="full")
    default = [r for r in cpu if r.get("is_default") and r["status"] == "ok"]
    if default and _time(cpu, "naive") and _time(cpu, "limit"):
        t = default[0]["time_ms_median"]
        out.append(f"CPU fp32 N=4096 D=256 fwd+bwd, default backend ({default[0]['impl']}): "
                   + _check("speed-up vs naive", _time(cpu, "naive") / t, 3) + "; "
                   + _check("time / limit", t / _time(cpu, "limit"), 1.3, at_least=False))
    gpu = _find(records, device="cuda", dtype="bf16", B=1, N=17550, Ds=768, Dt=768, mode="fwd+bwd", relation="full")
    naive = _time(gpu, "naive")
    for impl, vs_naive in (("triton", 3.5), ("cuda", 2.5)):  # issue 10's and issue 13's goals
        rec = next((r for r in gpu if r["impl"] == impl and r["status"] == "ok"), None)
        if rec is None:
            continue
        parts = [_check("vs naive", naive / rec["time_ms_median"], vs_naive) if naive else "naive did not run"]
        if rec.get("frac_of_limit") is not None and impl == "triton":
            parts.append(_check("of limit", 100 * rec["frac_of_limit"], 75, "%"))
        if rec.get("extra_mem_mb") is not None and impl == "triton":
            map_mib = 17550 ** 2 / 8 / 2 ** 20  # the sign map, N^2 / 8 bytes
            parts.append(_check("peak memory beyond the gradient", rec["extra_mem_mb"], 64 + map_mib, " MiB",
                                at_least=False))
        if impl == "cuda" and _time(gpu, "triton"):
            parts.append(_check("time / triton", rec["time_ms_median"] / _time(gpu, "triton"), 1.5, at_least=False))
        out.append(f"bf16 N=17550 D=768 fwd+bwd, {impl} (two-pass): " + "; ".join(parts))
    big = _find(records, device="cuda", B=1, N=75600, Ds=768, Dt=768, mode="fwd+bwd", relation="full")
    fused = [r for r in big if r["impl"] in FUSED and r["status"] == "ok"]
    if big:
        naive_state = next((r["status"] for r in big if r["impl"] == "naive"), "not run")
        if fused:
            best = min(fused, key=lambda r: r["time_ms_median"])
            out.append(f"N=75600 fwd+bwd, best fused ({best['impl']}): "
                       + _check("time", best["time_ms_median"], 40, " ms", at_least=False) + f"; naive: {naive_state}")
        else:
            out.append("N=75600 fwd+bwd: no fused backend completed (target ≤ 40 ms: MISSED)")
    return out


# ---------------------------------------------------------------------------------------------- plots
def plot(records: List[Dict], out_dir: Path) -> List[Path]:
    """time_vs_n.png and memory_vs_n.png: one panel per N-sweep (>= 2 sizes), one line per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: "OrderedDict[Tuple, List[Dict]]" = OrderedDict()
    for rec in records:
        series.setdefault(tuple(rec[k] for k in SERIES_KEYS), []).append(rec)
    sweeps = [(key, recs) for key, recs in series.items() if len({r["N"] for r in recs}) >= 2]
    written = []
    for metric, ylabel, fname in (("time_ms_median", "median time (ms)", "time_vs_n.png"),
                                  ("peak_mem_mb", "peak memory growth (MiB)", "memory_vs_n.png")):
        if not sweeps:
            break
        fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4.2), squeeze=False)
        for ax, (key, recs) in zip(axes[0], sweeps):
            for impl in OrderedDict.fromkeys(r["impl"] for r in recs):
                pts = sorted((r["N"], r[metric]) for r in recs if r["impl"] == impl and r["status"] == "ok"
                             and r.get(metric))
                style = dict(color="black", linestyle="--") if impl == "limit" else dict(marker="o")
                if pts:
                    ax.plot(*zip(*pts), label=impl, **style)
            ax.set(xscale="log", yscale="log", xlabel="N (tokens per sample)", ylabel=ylabel)
            ax.set_title(" ".join(f"{k}={v}" for k, v in zip(SERIES_KEYS, key)), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.suptitle(f"{records[0]['device_name']} · {records[0]['date']} · {records[0]['git_commit']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(out_dir / fname)
    return written
