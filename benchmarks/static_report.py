"""What the GPU would run, read from the compiled code on a machine without a GPU, plus a modelled time.

    python benchmarks/static_report.py --out DIR [--quick]

1. Compiles every Triton kernel that a loss-only, default-training (two-pass) or memory-minimal pass
   launches (bf16, fp16, fp32; default configs; each relation where it changes the code) for sm_90 and
   sm_80, and takes the CUDA backend's kernels from the built extension's cubins (sm_90a, sm_80).
2. Writes each kernel's cubin and SASS under DIR and ``DIR/static_report.json``: one record per kernel
   with registers, spill bytes, shared memory and SASS instruction counts (HGMMA, HMMA, ATOMG, REDG, MEMBAR,
   LDGSTS, UTMALDG). The CUDA kernels' dynamic shared memory is sized at launch and is not in the cubin:
   their ``shared_bytes`` is the static part only (``shared_is_static_only``; sizes in csrc/README.md).
3. Adds a *modelled* time (a roofline with the assumptions written beside it, never a measurement) for
   each path at the shapes of the GPU benchmark, on H100 and H200, and writes ``DIR/static_report.md``.

Triton compiles to a cubin on any machine; cuobjdump (shipped with Triton) disassembles it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter does not compile kernels")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vrepa_kernels import sign_map  # noqa: E402
from vrepa_kernels.backends import triton_backend as tk  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")
SASS_OPCODES = ("HGMMA", "HMMA", "ATOMG", "REDG", "MEMBAR", "LDGSTS", "UTMALDG")


# ---------------------------------------------------------------------------------------------------------
# Compiling the Triton kernels without a GPU
# ---------------------------------------------------------------------------------------------------------

def _compile(fn, dtype, pointers: dict, constexprs: dict, cfg: dict, arch: int):
    """Compile ``fn`` for ``sm_<arch>`` as the launcher specialises it at D = 768, N = 17,550: 16-byte aligned
    pointers, feature dims and strides divisible by 16 (N itself is not)."""
    signature = {name: "i32" for name in fn.arg_names}
    signature.update({name: POINTER_TYPES[dtype] if kind == "x" else kind for name, kind in pointers.items()})
    if "margin" in signature:
        signature["margin"] = "fp32"
    constexprs = dict(constexprs, **{k: v for k, v in cfg.items() if k not in LAUNCH_OPTIONS})
    signature.update({name: "constexpr" for name in constexprs})
    aligned = [i for i, name in enumerate(fn.arg_names)
               if signature[name].startswith("*") or name in ("DS", "DT", "DIM") or "stride" in name]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    options = {k: cfg[k] for k in LAUNCH_OPTIONS if k in cfg}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def compile_relation_pass(dtype, arch: int, relation: str = "full", store_map: bool = True, cfg=None):
    cfg = cfg or tk.default_two_pass_config(dtype, arch)["relation"]
    pointers = dict(S="x", T="x", S_INV="*fp32", T_INV="*fp32", MAP="*i32", PARTIAL="*fp32")
    constexprs = dict(RELATION=tk.RELATION_CODES[relation], STORE_MAP=store_map, BLOCK=tk.MAP_TILE, UPCAST=False,
                      PRECISION="ieee")
    return _compile(tk.relation_pass_kernel, dtype, pointers, constexprs, cfg, arch), cfg


def compile_gradient_pass(dtype, arch: int, cfg=None):
    cfg = cfg or tk.default_two_pass_config(dtype, arch)["gradient"]
    pointers = dict(X="x", X_INV="*fp32", MAP="*i32", G="*fp32")
    constexprs = dict(MAP_TILE=tk.MAP_TILE, UPCAST=False, PRECISION="ieee")
    return _compile(tk.gradient_pass_kernel, dtype, pointers, constexprs, cfg, arch), cfg


def compile_fused(dtype, arch: int, relation: str = "full", symmetric: bool = True, grad_s: bool = True,
                  grad_t: bool = False, atomic_sem: str = "relaxed", cfg=None):
    cfg = cfg or tk.default_config(dtype, symmetric)
    pointers = dict(S="x", T="x", ROW_BLOCKS="*i32",
                    **{name: "*fp32" for name in ("S_INV", "T_INV", "GS", "GT", "PARTIAL")})
    constexprs = dict(RELATION=tk.RELATION_CODES[relation], SYMMETRIC=symmetric, GRAD_S=grad_s, GRAD_T=grad_t,
                      UPCAST=False, PRECISION="ieee", WIDE_OFFSETS=False, BLOCK_LIST=False, ATOMIC_SEM=atomic_sem)
    return _compile(tk.fused_kernel, dtype, pointers, constexprs, cfg, arch), cfg


def triton_jobs(quick: bool = False):
    """(name, role, dtype, arch, default_training, compile thunk) for every Triton kernel a pass launches."""
    jobs = []
    dtypes = (torch.bfloat16, torch.float16) if quick else (torch.bfloat16, torch.float16, torch.float32)
    for dtype in dtypes:
        low = dtype != torch.float32
        for arch in (90, 80):
            tag = f"{DTYPE_NAMES[dtype]}_sm{arch}"
            # Two-pass (the training default); spatial runs as full over one-frame samples.
            for relation in ("full", "temporal") if low else ("full",):
                jobs.append((f"relation_pass_{relation}_{tag}", "relation_pass", dtype, arch, True,
                             lambda d=dtype, a=arch, r=relation: compile_relation_pass(d, a, r)))
                jobs.append((f"loss_only_{relation}_{tag}", "loss_only", dtype, arch, False,
                             lambda d=dtype, a=arch, r=relation: compile_relation_pass(d, a, r, store_map=False)))
            jobs.append((f"gradient_pass_{tag}", "gradient_pass", dtype, arch, True,
                         lambda d=dtype, a=arch: compile_gradient_pass(d, a)))
            # Memory-minimal: symmetric (relaxed atomics) and row-owned (deterministic).
            for relation in ("full", "spatial", "temporal") if low and not quick else ("full",):
                jobs.append((f"memory_minimal_{relation}_{tag}", "memory_minimal", dtype, arch, False,
                             lambda d=dtype, a=arch, r=relation: compile_fused(d, a, r)))
            jobs.append((f"memory_minimal_row_owned_{tag}", "memory_minimal_row_owned", dtype, arch, False,
                         lambda d=dtype, a=arch: compile_fused(d, a, symmetric=False)))
            if dtype == torch.bfloat16 and arch == 90:  # the shipped acq_rel variant, for comparison
                jobs.append((f"memory_minimal_acq_rel_{tag}", "memory_minimal_acq_rel", dtype, arch, False,
                             lambda d=dtype, a=arch: compile_fused(d, a, atomic_sem="acq_rel")))
    return jobs


# ---------------------------------------------------------------------------------------------------------
# Reading cubins
# ---------------------------------------------------------------------------------------------------------

def cuobjdump(*args: str) -> str:
    return subprocess.run([str(CUOBJDUMP), *args], capture_output=True, text=True, check=True).stdout


def sass_counts(sass: str) -> dict:
    """Instructions of each opcode family in a SASS listing (``MEMBAR.ALL.GPU`` counts as MEMBAR and as
    MEMBAR_GPU; ``local_memory_ops`` counts spill loads and stores)."""
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    counts = {op: 0 for op in SASS_OPCODES}
    for op in opcodes:
        if op in counts:
            counts[op] += 1
    # sm_80 spells global reductions and atomics RED.E / ATOM.E (sm_90: REDG / ATOMG).
    counts["REDG"] += len(re.findall(r"\bRED\.E\.", sass))
    counts["ATOMG"] += len(re.findall(r"\bATOM\.E\.", sass))
    counts["MEMBAR_GPU"] = len(re.findall(r"MEMBAR\.[A-Z.]*GPU", sass))
    counts["local_memory_ops"] = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    return counts


def _resource_usage(text: str) -> dict:
    """``{function: {REG, STACK, SHARED, LOCAL}}`` from ``cuobjdump -res-usage``."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    return out


def triton_record(name, role, dtype, arch, default_training, kernel, cfg, out_dir: Path) -> dict:
    cubin = out_dir / "triton" / f"{name}.cubin"
    cubin.parent.mkdir(parents=True, exist_ok=True)
    cubin.write_bytes(kernel.asm["cubin"])
    sass = cuobjdump("-sass", str(cubin))
    cubin.with_suffix(".sass").write_text(sass)
    usage = next(iter(_resource_usage(cuobjdump("-res-usage", str(cubin))).values()))
    return dict(name=name, backend="triton", role=role, dtype=DTYPE_NAMES[dtype], arch=f"sm_{arch}",
                config=cfg, default_training=default_training, cubin=str(cubin.relative_to(out_dir)),
                sass=str(cubin.with_suffix(".sass").relative_to(out_dir)), registers=usage["REG"],
                spill_bytes=usage["STACK"] + usage.get("LOCAL", 0), shared_bytes=int(kernel.metadata.shared),
                **sass_counts(sass))


def cuda_records(out_dir: Path) -> list:
    """Records for the CUDA backend's kernels, from the cubins embedded in the built ``_C_cuda``."""
    import importlib.util

    spec = importlib.util.find_spec("vrepa_kernels._C_cuda")
    if spec is None or not spec.origin:
        return []
    cuda_dir = out_dir / "cuda"
    cuda_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(CUOBJDUMP), "-xelf", "all", spec.origin], cwd=tmp, capture_output=True, check=True)
        cubins = sorted(Path(tmp).glob("*.cubin"))
        records = []
        for cubin in cubins:
            arch_m = re.search(r"sm_(\d+a?)", cubin.name)
            if not arch_m:
                continue
            arch = f"sm_{arch_m.group(1)}"
            dest = cuda_dir / cubin.name
            dest.write_bytes(cubin.read_bytes())
            usage = _resource_usage(cuobjdump("-res-usage", str(dest)))
            for function, res in usage.items():
                sass = cuobjdump("-sass", "-fun", function, str(dest))
                role = next((r for r in ("relation_pass", "gradient_pass", "fused") if r in function), "other")
                if role == "other":
                    continue
                dtype = next((d for d in ("bf16", "f16", "f32") if d in function.lower()), None)
                dtype = {"f16": "fp16", "f32": "fp32"}.get(dtype, dtype)
                if dtype is None:  # a template argument: __nv_bfloat16, __half or float
                    demangled = function
                    dtype = ("bf16" if "bfloat16" in demangled else "fp16" if "half" in demangled
                             else "fp32")
                sass_file = cuda_dir / f"{function}.{arch}.sass"
                sass_file.write_text(sass)
                records.append(dict(name=function, backend="cuda", role=role, dtype=dtype, arch=arch, config={},
                                    default_training=role in ("relation_pass", "gradient_pass"),
                                    cubin=str(dest.relative_to(out_dir)), sass=str(sass_file.relative_to(out_dir)),
                                    registers=res["REG"], spill_bytes=res["STACK"] + res.get("LOCAL", 0),
                                    shared_bytes=res.get("SHARED", 0), shared_is_static_only=True,
                                    **sass_counts(sass)))
        return records


# ---------------------------------------------------------------------------------------------------------
# The model (modelled, not measured)
# ---------------------------------------------------------------------------------------------------------

# Public spec-sheet figures (dense bf16 tensor-core peak, HBM bandwidth); the efficiencies are assumptions.
DEVICES = {
    "H100 SXM": dict(bf16_tflops=989.0, hbm_tbps=3.35, memory_gb=80),
    "H200": dict(bf16_tflops=989.0, hbm_tbps=4.8, memory_gb=141),
}
NAIVE_PEAK_BYTES_PER_PAIR = 16  # bf16 Grams, fp32 difference and its gradient alive at once (assumed)
SHAPES = [(2, 3_600), (1, 17_550), (1, 32_400), (1, 75_600)]
FEATURES = 768
ASSUMPTIONS = {
    "useful work": "4 N^2 D per sample: Gram of s and t over the pair triangle (2 N^2 D) plus G = P s (2 N^2 D)",
    "GEMM limit": "useful work at 75% of the dense bf16 peak (what FlashAttention-3 reaches on H100); "
                  "fraction of limit = limit / time",
    "two_pass": "4 N^2 D on 128-tile HGMMA at 45-70% of peak (Triton), map written once and read once per "
                "feature chunk (D / 128 chunks), features streamed from L2; no atomics",
    "memory_minimal": "4 N^2 D on 64-tile tensor cores at 30-50% of peak, plus N^2 D / 64 fp32 relaxed "
                      "reductions at 1-4e12 elements/s (L2 reduction throughput, assumed), 1.9x grid imbalance "
                      "on the atomics",
    "memory_minimal_acq_rel": "as memory_minimal, but a GPU-scope fence before each vector atomic: "
                              "0.25-1e12 elements/s",
    "torch": "strips: 4 N^2 D in cuBLAS at 60-75% of peak, plus about 30 bytes of HBM traffic per pair in the "
             "upper triangle (fp32 strip written, read by softshrink, sum, sign, cast)",
    "naive": "8 N^2 D in cuBLAS at 60-75% of peak (full Grams and their backward), plus about 50 bytes of HBM "
             "traffic per pair (bf16 Grams, fp32 difference, clip, sum and their backward); it fits when "
             f"{NAIVE_PEAK_BYTES_PER_PAIR} bytes per pair fit the device memory",
}


def model(batch: int, n: int, device: dict) -> dict:
    """Modelled fwd+bwd time ranges (ms) per path for one call at ``batch`` x ``n`` tokens, D = 768, bf16."""
    peak = device["bf16_tflops"] * 1e12
    bw = device["hbm_tbps"] * 1e12
    pairs = batch * n * n
    useful = 4.0 * pairs * FEATURES
    map_bytes = sign_map.map_bytes(batch, n)
    atomics = pairs * FEATURES / 64
    ms = lambda seconds: round(seconds * 1e3, 3)

    def gemm(flops, lo, hi):
        return flops / (hi * peak), flops / (lo * peak)

    limit = useful / (0.75 * peak)
    two_pass = gemm(useful, 0.45, 0.70)
    two_pass = tuple(t + map_bytes * (1 + FEATURES / 128) / bw for t in two_pass)
    minimal_gemm = gemm(useful, 0.30, 0.50)
    minimal = (minimal_gemm[0] + 1.9 * atomics / 4e12, minimal_gemm[1] + 1.9 * atomics / 1e12)
    acq_rel = (minimal_gemm[0] + 1.9 * atomics / 1e12, minimal_gemm[1] + 1.9 * atomics / 0.25e12)
    torch_path = tuple(t + 30 * pairs / 2 / bw for t in gemm(useful, 0.60, 0.75))
    naive = tuple(t + 50 * pairs / bw for t in gemm(2 * useful, 0.60, 0.75))
    naive_fits = NAIVE_PEAK_BYTES_PER_PAIR * pairs <= device["memory_gb"] * 1e9
    rows = {}
    for name, (fast, slow), flops, atoms, mbytes in (
            ("two_pass", two_pass, useful, 0, map_bytes),
            ("memory_minimal", minimal, useful, atomics, 0),
            ("memory_minimal_acq_rel", acq_rel, useful, atomics, 0),
            ("torch", torch_path, useful, 0, 0),
            ("naive", naive, 2 * useful, 0, 0)):
        rows[name] = dict(flops=flops, atomics=atoms, map_bytes=mbytes, time_ms=[ms(fast), ms(slow)],
                          fraction_of_limit=[round(limit / slow, 2), round(limit / fast, 2)],
                          fits=naive_fits if name == "naive" else True)
    return dict(batch=batch, n=n, d=FEATURES, gemm_limit_ms=ms(limit), paths=rows)


def modelled_times() -> dict:
    return dict(label="modelled (a roofline; not measured)", assumptions=ASSUMPTIONS,
                devices={name: dict(spec=dev, shapes=[model(b, n, dev) for b, n in SHAPES])
                         for name, dev in DEVICES.items()})


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = ["# Static report: compiled code (read, not run) and modelled times", "",
             f"triton {triton.__version__}, torch {torch.__version__}, cuobjdump from Triton's bundle.", "",
             "| kernel | backend | role | dtype | arch | default training | regs | spill B | smem KiB |"
             + " ".join(f" {op} |" for op in SASS_OPCODES) + " MEMBAR.GPU |",
             "|---|---|---|---|---|---|---:|---:|---:|" + "---:|" * (len(SASS_OPCODES) + 1)]
    for r in report["kernels"]:
        lines.append(f"| {r['name']} | {r['backend']} | {r['role']} | {r['dtype']} | {r['arch']} | "
                     f"{'yes' if r['default_training'] else ''} | {r['registers']} | {r['spill_bytes']} | "
                     f"{r['shared_bytes'] / 1024:.0f} |" + "".join(f" {r[op]} |" for op in SASS_OPCODES)
                     + f" {r['MEMBAR_GPU']} |")
    modelled = report["modelled"]
    lines += ["", f"## Modelled fwd+bwd time, bf16, D = {FEATURES} ({modelled['label']})", ""]
    for name, text in modelled["assumptions"].items():
        lines.append(f"- {name}: {text}")
    for device, entry in modelled["devices"].items():
        lines += ["", f"### {device} (modelled; {entry['spec']['bf16_tflops']:.0f} TFLOPS bf16 dense, "
                      f"{entry['spec']['hbm_tbps']} TB/s)", "",
                  "| B x N | GEMM limit ms | path | time ms | fraction of limit | fp32 atomics | map MB |",
                  "|---|---:|---|---|---|---:|---:|"]
        for shape in entry["shapes"]:
            for path, row in shape["paths"].items():
                time = (f"{row['time_ms'][0]:.3g}-{row['time_ms'][1]:.3g}" if row["fits"]
                        else "does not fit")
                share = (f"{row['fraction_of_limit'][0]}-{row['fraction_of_limit'][1]}" if row["fits"] else "–")
                lines.append(f"| {shape['batch']} x {shape['n']:,} | {shape['gemm_limit_ms']:.3g} | {path} | "
                             f"{time} | {share} | {row['atomics']:.2g} | {row['map_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def build(out_dir: Path, quick: bool = False, progress=print) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    jobs = triton_jobs(quick)
    for i, (name, role, dtype, arch, default_training, compile_fn) in enumerate(jobs, 1):
        kernel, cfg = compile_fn()
        records.append(triton_record(name, role, dtype, arch, default_training, kernel, cfg, out_dir))
        progress(f"[{i}/{len(jobs)}] {name}: {records[-1]['registers']} regs, {records[-1]['spill_bytes']} B spilled")
    cuda = cuda_records(out_dir)
    progress(f"cuda: {len(cuda)} kernels from the built extension" if cuda else
             "cuda: the extension is not built here (no records)")
    report = dict(triton=triton.__version__, torch=torch.__version__, kernels=records + cuda,
                  modelled=modelled_times())
    (out_dir / "static_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "static_report.md").write_text(markdown(report))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the cubins, SASS and the report")
    p.add_argument("--quick", action="store_true", help="bf16 and fp16, fewer memory-minimal variants (CI)")
    args = p.parse_args(argv)
    build(args.out, args.quick)
    print((args.out / "static_report.md").read_text())


if __name__ == "__main__":
    main()
