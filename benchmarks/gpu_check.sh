#!/usr/bin/env bash
# GPU validation in one command, for a bare GPU machine with torch, Triton, nvcc, cmake and ninja but no
# network:   bash benchmarks/gpu_check.sh
#
# 1. installs this checkout into the current python without downloads (a failed CUDA build is reported,
#    and the checkout is then used through PYTHONPATH);
# 2. prints `python -m vrepa_kernels.info` where that module exists;
# 3. runs the GPU tests (pytest -m gpu tests), then benchmarks/test_bench.py, on the GPU;
# 4. times a few Triton tile configs of both paths (benchmarks/tune_triton.py --quick) and pins the fastest
#    for this GPU, with the faster path for algorithm="auto" (copied to $OUT/triton_configs.json: commit it
#    as vrepa_kernels/backends/triton_configs.json);
# 5. runs the GPU benchmark (benchmarks/run.py --gpu): two-pass, memory-minimal, the acq_rel variant once,
#    the torch backend, naive and torch.compile, for Triton and CUDA;
# 5. writes report.md and report.json (plus the benchmark's results.json/.md and plots, and
#    gpu_check.log) under benchmarks/results/<gpu-name>-<date>/, naming the GPU and the commit.
#
# Environment: PYTHON (default python3), OUT_DIR (default benchmarks/results/<gpu>-<date>),
# VREPA_GIT_COMMIT (the commit to name where the checkout has no .git), TOTAL_BUDGET_S (default 480:
# the benchmark gets what the earlier steps left of it, at least 120 s), TEST_TIMEOUT_S (default 120),
# TUNE_TIMEOUT_S (default 90). The whole check is meant to fit 8 minutes on a bare H100.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
START=$(date +%s)

GPU_NAME=$("$PY" -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))') \
  || { echo "gpu_check: $PY's torch sees no CUDA device; nothing to check" >&2; exit 1; }
SLUG=$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
OUT="${OUT_DIR:-benchmarks/results/$SLUG-$(date +%F)}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export VREPA_GIT_COMMIT="${VREPA_GIT_COMMIT:-$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import measure; print(measure.git_commit())')}"
echo "== gpu_check: $GPU_NAME, commit $VREPA_GIT_COMMIT, $(date -Is), output in $OUT"

echo "== 1/5 install (no network)"
if timeout 400 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/.install.log" 2>&1; then
  INSTALL="ok"
else
  INSTALL="failed (rc $?); using the checkout through PYTHONPATH"
  tail -n 25 "$OUT/.install.log"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "install: $INSTALL"

echo "== 2/5 build info"
if "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vrepa_kernels.info") is None)' 2>/dev/null; then
  "$PY" -m vrepa_kernels.info >"$OUT/.info.txt" 2>&1 || echo "(vrepa_kernels.info exited with $?)" >>"$OUT/.info.txt"
else
  echo "vrepa_kernels.info does not exist in this checkout" >"$OUT/.info.txt"
fi
cat "$OUT/.info.txt"

echo "== 3/5 GPU tests"
TEST_RC=""
if "$PY" -c 'import pytest' 2>/dev/null; then
  TEST_END=$(( $(date +%s) + ${TEST_TIMEOUT_S:-120} ))
  timeout "${TEST_TIMEOUT_S:-120}" "$PY" -m pytest -q -ra -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/.tests.log"
  TEST_RC=${PIPESTATUS[0]}
  GPU_TESTS=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$OUT/.tests.log" | tail -n 1)
  timeout $(( TEST_END - $(date +%s) > 30 ? TEST_END - $(date +%s) : 30 )) "$PY" -m pytest -q -ra \
    -p no:cacheprovider benchmarks/test_bench.py --benchmark-disable 2>&1 | tee -a "$OUT/.tests.log"
  BENCH_TEST_RC=${PIPESTATUS[0]}
  BENCH_TESTS=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/.tests.log" | tail -n 1)
  TESTS="tests -m gpu: rc $TEST_RC, $GPU_TESTS; benchmarks/test_bench.py: rc $BENCH_TEST_RC, $BENCH_TESTS"
  [ "$TEST_RC" = 0 ] && TEST_RC=$BENCH_TEST_RC
  [ "$TEST_RC" = 124 ] && TESTS="timed out (rc 124 = timeout, limit ${TEST_TIMEOUT_S:-120} s in all); $TESTS"
else
  TESTS="not run: pytest is not installed for $PY (carry a wheel: see benchmarks/README.md)"
  echo "$TESTS" | tee "$OUT/.tests.log"
fi

echo "== 4/5 pin Triton configs and the faster path (quick tune)"
timeout "${TUNE_TIMEOUT_S:-90}" "$PY" benchmarks/tune_triton.py --quick --reps 3 --write \
  --copy-to "$OUT/triton_configs.json" 2>&1 | tee "$OUT/tune.log"
TUNE_RC=${PIPESTATUS[0]}
echo "tune: rc $TUNE_RC"

echo "== 5/5 GPU benchmark"
LEFT=$(( ${TOTAL_BUDGET_S:-480} - ($(date +%s) - START) ))
BUDGET=$(( LEFT > 120 ? LEFT : 120 ))
timeout $(( BUDGET + 90 )) "$PY" benchmarks/run.py --gpu --out "$OUT" --no-progress --time-budget "$BUDGET"
BENCH_RC=$?

"$PY" - "$OUT" "$GPU_NAME" "$VREPA_GIT_COMMIT" "$INSTALL" "$TESTS" "$BENCH_RC" "$(( $(date +%s) - START ))" \
  "$TUNE_RC" <<'EOF'
import datetime, json, sys
from pathlib import Path
out, gpu, commit, install, tests, bench_rc, seconds, tune_rc = sys.argv[1:]
out = Path(out)
read = lambda name: (out / name).read_text() if (out / name).exists() else ""
results = json.loads(read("results.json") or "[]")
sys.path.insert(0, "benchmarks")
import report
targets = report.targets(results) if results else []
env = results[0] if results else {}
summary = dict(gpu=gpu, commit=commit, date=datetime.date.today().isoformat(), seconds=int(seconds),
               torch=env.get("torch_version"), triton=env.get("triton_version"), cuda=env.get("cuda_version"),
               install=install, tune_rc=int(tune_rc), build_info=read(".info.txt").strip(), tests=tests,
               tests_log_tail=read(".tests.log").splitlines()[-40:], benchmark_rc=int(bench_rc),
               benchmark_results="results.json", targets=targets)
(out / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
md = [f"# GPU check: {gpu}", "", f"- commit: `{commit}`; date: {summary['date']}; took {seconds} s",
      f"- torch {summary['torch']}, triton {summary['triton']}, CUDA {summary['cuda']}",
      f"- install: {install}", f"- GPU tests: {tests}", f"- tune (triton_configs.json): exit code {tune_rc}",
      f"- benchmark: exit code {bench_rc}", "",
      "## Build info", "", "```", summary["build_info"], "```", "", "## Targets", ""]
md += [f"- {t}" for t in targets] or ["- no target case was measured"]
md += ["", "## GPU tests (tail)", "", "```", *summary["tests_log_tail"], "```", "",
       "## Benchmark", "", read("results.md").replace("# TRD loss benchmark", "### TRD loss benchmark", 1)]
(out / "report.md").write_text("\n".join(md) + "\n")
print(f"gpu_check: wrote {out / 'report.md'} and {out / 'report.json'}")
EOF
rm -f "$OUT/.install.log" "$OUT/.info.txt" "$OUT/.tests.log"
[ -z "$TEST_RC" ] || [ "$TEST_RC" = 0 ] || exit "$TEST_RC"
exit "$BENCH_RC"
