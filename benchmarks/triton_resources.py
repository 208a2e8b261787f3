"""Compile the Triton kernel for NVIDIA targets without a GPU and report registers, spills and smem.

    python benchmarks/triton_resources.py                  # default configs, sm_80 and sm_90
    python benchmarks/triton_resources.py --candidates     # every tune_triton.py candidate (bf16, sm_90)

Triton compiles to a cubin on any machine; cuobjdump (shipped with Triton) reads the resource usage.
STACK > 0 means register spills to local memory: a config that spills is slow on the GPU.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from vrepa_kernels.backends import triton_kernels  # noqa: E402

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


def compile_variant(dtype: torch.dtype, cfg: dict, arch: int, relation: str = "full", symmetric: bool = True,
                    grad_s: bool = True, grad_t: bool = False):
    """Compile one kernel variant for ``sm_<arch>``; returns the CompiledKernel."""
    fn = triton_kernels._trd_kernel
    signature = {name: "i32" for name in fn.arg_names}
    signature.update(S=POINTER_TYPES[dtype], T=POINTER_TYPES[dtype], margin="fp32", ROW_BLOCKS="*i32")
    signature.update({name: "*fp32" for name in ("S_INV", "T_INV", "GS", "GT", "PARTIAL")})
    constexprs = dict(RELATION=triton_kernels.RELATION_CODES[relation], SYMMETRIC=symmetric, GRAD_S=grad_s,
                      GRAD_T=grad_t, UPCAST=False, PRECISION="ieee", WIDE_OFFSETS=False, BLOCK_LIST=False,
                      **{k: v for k, v in cfg.items() if k not in LAUNCH_OPTIONS})
    signature.update({name: "constexpr" for name in constexprs})
    options = {k: cfg[k] for k in LAUNCH_OPTIONS if k in cfg}
    # What Triton's launcher specialises at D = 768 and N = 17,550: 16-byte aligned pointers, feature dims
    # and strides divisible by 16 (N itself is not).
    aligned = [i for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")
               or name in ("DS", "DT") or "stride" in name]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def resources(kernel) -> dict:
    """Registers, spill stack bytes and static/dynamic shared memory of a compiled kernel."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return dict(registers=int(found["REG"]), spill_stack_bytes=int(found["STACK"]) + int(found.get("LOCAL", 0)),
                shared_bytes=int(kernel.metadata.shared))


def report(rows):
    print("| dtype | arch | schedule | config | registers | spill stack B | shared KiB |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | sm_{r['arch']} | {r['schedule']} | {r['config']} | {r['registers']} "
              f"| {r['spill_stack_bytes']} | {r['shared_bytes'] / 1024:.0f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", action="store_true", help="every tune_triton.py candidate, bf16, sm_90")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    if args.candidates:
        import tune_triton

        jobs = [(torch.bfloat16, 90, sym, cfg) for sym in (True, False) for cfg in tune_triton.candidates(sym)]
    else:
        jobs = [(dtype, arch, sym, triton_kernels.default_config(dtype, sym))
                for dtype in (torch.bfloat16, torch.float32) for arch in (80, 90) for sym in (True, False)]
    for dtype, arch, symmetric, cfg in jobs:
        row = dict(dtype=str(dtype).replace("torch.", ""), arch=arch,
                   schedule="symmetric" if symmetric else "row_owned", config=cfg)
        try:
            row.update(resources(compile_variant(dtype, cfg, arch, symmetric=symmetric)))
        except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory)
            row.update(registers=-1, spill_stack_bytes=-1, shared_bytes=0, error=f"{type(exc).__name__}: {exc}"[:200])
        rows.append(row)
        print(json.dumps(row), flush=True)
    report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
