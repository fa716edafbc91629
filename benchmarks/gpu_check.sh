#!/usr/bin/env bash
# GPU check, in one run of at most ~8 minutes on one GPU (sized for an H200):
#   1. the Triton differential tests (tests/test_triton.py) with compiled kernels on CUDA
#      (OPTCOMPILE_TEST_DEVICE=cuda: tensors on the GPU, no interpreter);
#   2. the GPU step benchmark: ours (multi-tensor Triton) AdamW, StableAdamW and Lion against
#      torch.optim fused (AdamW; the closest by traffic for the others, as bench_step.py does) and
#      optimi's Triton backend, on a 1.31B-param GPT-shaped set and 2,000 small tensors, fp32 and
#      bf16: ms/step, GB/s and % of the HBM bandwidth measured in the same run (copy_/add_).
# Writes everything to one markdown file (benchmarks/results/gpu_check-<UTC date>.md, also into
# $OUT when that is set) and to stdout. Exit status: 0 when every phase passed, 1 when a phase
# failed or timed out, 2 when no Python with CUDA-enabled torch is found, 3 when a required
# package is missing.
#
# What it assumes (benchmarks/README.md, "GPU check"): no network. The project's .venv (2 GB, CPU
# torch) does not travel to the GPU machine, so it uses the first of $PYTHON, .venv/bin/python,
# python3 whose torch sees a GPU, with optcompile imported from this tree (PYTHONPATH) and its
# dependencies (torch, triton, jinja2, sympy, numpy, filelock; pytest for phase 1) from that
# Python. torch-optimi is optional: when it is missing, it is taken from .whl/site/optimi (a copy
# of an installed one, written by --prepare) or installed from .whl/torch_optimi-*.whl into a
# temporary folder (--no-index); otherwise the optimi columns stay empty. .whl is ignored by git:
# carry it to the GPU machine with the tree.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--tests-timeout S] [--bench-timeout S]
#                                [--skip-tests] [--skip-bench] [--smoke]
#   bash benchmarks/gpu_check.sh --prepare   # here, before: copy this machine's optimi into .whl/site
#   --smoke: every phase at toy size on CPU (interpreter tests subset, tiny benchmark), to check
#            this script itself on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)

OUTDIR=benchmarks/results
TESTS_TIMEOUT=180
BENCH_TIMEOUT=240
SKIP_TESTS=0
SKIP_BENCH=0
SMOKE=0
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUTDIR=${2:?--out needs a folder}; shift 2 ;;
        --tests-timeout) TESTS_TIMEOUT=${2:?--tests-timeout needs seconds}; shift 2 ;;
        --bench-timeout) BENCH_TIMEOUT=${2:?--bench-timeout needs seconds}; shift 2 ;;
        --skip-tests) SKIP_TESTS=1; shift ;;
        --skip-bench) SKIP_BENCH=1; shift ;;
        --smoke) SMOKE=1; shift ;;
        --prepare)
            # torch-optimi is pure Python: a copy of the installed package (and its metadata) runs anywhere
            src=$("${PYTHON:-.venv/bin/python}" -c 'import optimi, os; print(os.path.dirname(optimi.__file__))') || {
                echo "gpu_check.sh --prepare: ${PYTHON:-.venv/bin/python} cannot import optimi" >&2; exit 3; }
            rm -rf .whl/site && mkdir -p .whl/site && cp -r "$src" .whl/site/ &&
                cp -r "$(dirname "$src")"/torch_optimi-*.dist-info .whl/site/ 2>/dev/null
            find .whl/site -name __pycache__ -prune -exec rm -rf {} +
            echo "gpu_check.sh: optimi copied from $src into .whl/site (carry .whl with the tree)"; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (--help lists them)" >&2; exit 64 ;;
    esac
done
for v in "$TESTS_TIMEOUT" "$BENCH_TIMEOUT"; do
    case "$v" in ''|*[!0-9]*) echo "gpu_check.sh: a timeout must be whole seconds, got '$v'" >&2; exit 64 ;; esac
done

progress() { printf '[gpu_check +%3ds] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ── phase 0: a Python whose torch sees a GPU ─────────────────────────────────────────────────
progress "phase 0: looking for a Python with CUDA-enabled torch"
PY=""
PROBE='import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'
for cand in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
    seen=$(timeout 60 "$cand" -c "$PROBE" 2>&1 | tail -1)
    echo "  $cand: torch ${seen:-(no answer)}"
    case "$seen" in
        *" True") PY=$cand; break ;;
        *" False") [ "$SMOKE" = 1 ] && { PY=$cand; break; } ;;
    esac
done
if [ -z "$PY" ]; then
    echo "gpu_check.sh: no Python here has torch with a usable GPU (torch.cuda.is_available() is False or" \
         "torch is missing for each of: \$PYTHON, .venv/bin/python, python3). Run this on the GPU machine," \
         "or set PYTHON to a Python whose torch is built with CUDA." >&2
    exit 2
fi
PY=$(command -v "$PY")
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c "import optimi" >/dev/null 2>&1; then
    wheel=$(ls .whl/torch_optimi-*.whl 2>/dev/null | head -1)
    if [ -d .whl/site/optimi ] && PYTHONPATH="$PYTHONPATH:$ROOT/.whl/site" "$PY" -c "import optimi" >/dev/null 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$ROOT/.whl/site"
        echo "  torch-optimi from .whl/site (copied by --prepare)"
    elif [ -n "$wheel" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$wheel"; then
        export PYTHONPATH="$PYTHONPATH:$WORK/site"
        echo "  torch-optimi installed from $wheel (no network)"
    else
        echo "  torch-optimi not found (no .whl/site/optimi or .whl/torch_optimi-*.whl): the optimi columns stay empty"
    fi
fi
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "triton", "jinja2", "sympy", "numpy", "filelock", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check.sh: $PY lacks: $missing (nothing can be installed without a network)" >&2
    exit 3
fi

STAMP=$(date -u +%Y-%m-%d-%H%M)
NAME="gpu_check-$STAMP$([ "$SMOKE" = 1 ] && echo -smoke).md"
mkdir -p "$OUTDIR"
REPORT="$OUTDIR/$NAME"
ENVINFO=$("$PY" - <<'EOF'
import platform, torch, triton
try:
    import optimi
    ov = optimi.__version__ if hasattr(optimi, "__version__") else "present"
except ImportError:
    ov = "absent"
dev = (f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, "
       f"capability {'.'.join(map(str, torch.cuda.get_device_capability()))}") if torch.cuda.is_available() else "no GPU"
print(f"- device: {dev}; Python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"triton {triton.__version__}; torch-optimi {ov}")
EOF
)
REV=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown")
DIRTY=$(git status --porcelain 2>/dev/null | grep -q . && echo " + uncommitted edits" || true)
SMI=$(command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi \
      --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>/dev/null)
echo "$ENVINFO"
progress "phase 0 done: $PY"

# ── phase 1: Triton differential tests on CUDA ──────────────────────────────────────────────
TESTS_RC=skipped TESTS_S=0
if [ "$SKIP_TESTS" = 0 ]; then
    progress "phase 1: tests/test_triton.py on $([ "$SMOKE" = 1 ] && echo 'CPU (smoke)' || echo CUDA) (timeout ${TESTS_TIMEOUT}s)"
    args=(-q -p no:cacheprovider -o console_output_style=classic tests/test_triton.py)
    if [ "$SMOKE" = 1 ]; then
        dev=cpu; args+=(-k "printer_golden or cpu_without_interpreter")
    else
        dev=cuda
        "$PY" -c "import xdist" >/dev/null 2>&1 && args+=(-n 4)  # the kernels' compiles overlap
    fi
    t=$(date +%s)
    OPTCOMPILE_TEST_DEVICE=$dev timeout -k 10 "$TESTS_TIMEOUT" "$PY" -m pytest "${args[@]}" 2>&1 | tee "$WORK/tests.log"
    TESTS_RC=${PIPESTATUS[0]} TESTS_S=$(( $(date +%s) - t ))
    progress "phase 1 done: exit $TESTS_RC in ${TESTS_S}s"
fi

# ── phase 2: the GPU step benchmark ─────────────────────────────────────────────────────────
BENCH_RC=skipped BENCH_S=0
if [ "$SKIP_BENCH" = 0 ]; then
    if [ "$SMOKE" = 1 ]; then
        bargs=(--device cpu --threads 1 --scale 0.0005 --sets gpt2-1b --optimizers adamw,lion --dtypes fp32,bf16
               --only "ours fused,fused" --rounds 1)
    else
        bargs=(--device cuda --sets gpt2-1b,small --optimizers adamw,stableadamw,lion --dtypes fp32,bf16
               --only "ours triton,fused,optimi triton" --rounds 5 --steps 5)
    fi
    progress "phase 2: benchmarks/bench_step.py ${bargs[*]} (timeout ${BENCH_TIMEOUT}s)"
    t=$(date +%s)
    timeout -k 10 "$BENCH_TIMEOUT" "$PY" benchmarks/bench_step.py "${bargs[@]}" --no-compile-costs \
        --out "$WORK/bench.md" 2>&1 | tee "$WORK/bench.log"
    BENCH_RC=${PIPESTATUS[0]} BENCH_S=$(( $(date +%s) - t ))
    progress "phase 2 done: exit $BENCH_RC in ${BENCH_S}s"
fi

# ── the report ──────────────────────────────────────────────────────────────────────────────
verdict() { case "$1" in 0) echo passed ;; skipped) echo skipped ;; 124|137) echo "TIMED OUT" ;; *) echo "FAILED (exit $1)" ;; esac; }
{
    echo "# GPU check $STAMP$([ "$SMOKE" = 1 ] && echo ' (smoke run on CPU: toy sizes, not GPU results)')"
    echo
    echo "$ENVINFO"
    [ -n "$SMI" ] && echo "- nvidia-smi: $SMI"
    echo "- tree: $REV$DIRTY; Python $PY; total $(( $(date +%s) - T0 ))s"
    echo
    echo "| phase | result | seconds |"
    echo "|---|---|---|"
    echo "| tests/test_triton.py (OPTCOMPILE_TEST_DEVICE=$([ "$SMOKE" = 1 ] && echo cpu || echo cuda)) | $(verdict "$TESTS_RC") | $TESTS_S |"
    echo "| benchmarks/bench_step.py | $(verdict "$BENCH_RC") | $BENCH_S |"
    echo
    if [ -f "$WORK/tests.log" ]; then
        echo "## Triton tests"
        echo
        echo '```'
        grep -E "^(FAILED|ERROR)|passed|failed|error" "$WORK/tests.log" | tail -40
        echo '```'
        echo
    fi
    if [ -f "$WORK/bench.md" ]; then
        sed 's/^#/##/' "$WORK/bench.md"
    elif [ -f "$WORK/bench.log" ]; then
        echo "## Benchmark (incomplete: what it printed before it stopped)"
        echo
        sed 's/^#/##/' "$WORK/bench.log"
    fi
} > "$REPORT"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$(cd "$OUT" && pwd)" != "$(cd "$OUTDIR" && pwd)" ]; then
    cp "$REPORT" "$OUT/"
    [ -f "$WORK/tests.log" ] && cp "$WORK/tests.log" "$OUT/gpu_check-tests.log"
    [ -f "$WORK/bench.log" ] && cp "$WORK/bench.log" "$OUT/gpu_check-bench.log"
fi
echo
cat "$REPORT"
progress "report: $REPORT"
[ "$TESTS_RC" = 0 -o "$TESTS_RC" = skipped ] && [ "$BENCH_RC" = 0 -o "$BENCH_RC" = skipped ]
