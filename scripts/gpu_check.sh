#!/usr/bin/env bash
# The GPU check: CUDA tests, the overhead bench, the trainer-vs-bench check and a
# 2-epoch run per method on one CUDA GPU; every step time-boxed, everything in one folder.
#
# Prepared for a 15-minute GPU budget (machine start included; about 8 minutes of work),
# from the repo root of a machine with PyTorch, timm, pandas and matplotlib:
#   bash scripts/gpu_check.sh --quick --wheels wheels
# The full check (more repeats; about 12 minutes):   bash scripts/gpu_check.sh --wheels wheels
# The same steps on the CPU at tiny size (CI, tests/test_gpu_check.py):   bash scripts/gpu_check.sh --dry-run
# Build the wheel folder beforehand, beside the checkout, on a machine with PyPI (make gpu-wheels):
#   python scripts/gpu_wheels.py wheels      (--from-installed: offline, from this Python's copies)
#
# Steps (a step that fails or runs out of time is recorded, and the next one runs):
#   0. setup: GPU name, driver (nvidia-smi), torch and CUDA versions, the command -> env.json;
#      esam from this checkout (PYTHONPATH: nothing is built, any Python 3.11+ will do); missing
#      pure-Python packages (hydra-core, omegaconf, antlr4, submitit) only from --wheels DIR
#      (pip --no-index, with the installed torch pinned as a constraint, so pip never touches it);
#      wandb is not needed (every run here uses logger=none)
#   1. pytest -m cuda (tests/test_cuda.py)
#   2. python -m esam.bench: ResNet-18 CIFAR batch 128 in bf16 and in tf32, WRN-28-10 batch 256
#      in bf16; every registered method plus sam_m64/esam_m64; FLOPs and phases       -> bench/
#   3. trainer vs bench: the trainer's SGD images/s at least 95% of the bench's       -> pipeline/
#   4. a 2-epoch synthetic CIFAR-shaped run per method                                 -> train/<method>/
#   summary.md: each step's status and time, the bench tables, the training table; logs/ per step.
# It calls no PyTorch API newer than 2.11, the lent machines' version (pyproject pins 2.14.1 for CI).
#
# Options: --out DIR      (default results/gpu/<gpu-name>; with --dry-run outputs/gpu-check/dry-run-<time>)
#          --wheels DIR   --methods a,b,c (default: every method with a conf/optimizer option)
#          --quick        --dry-run       --python PY (default: .venv/bin/python if present, else python or python3)
#          --download-wheels DIR (= python scripts/gpu_wheels.py DIR)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
COMMAND="bash scripts/gpu_check.sh $*"
OUT="" WHEELS="" METHODS="" QUICK=0 DRY=0 DOWNLOAD=""
PY="python"
command -v python >/dev/null || PY="python3"  # some images have only python3
[ -x "$REPO/.venv/bin/python" ] && PY="$REPO/.venv/bin/python"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --methods) METHODS="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --dry-run) DRY=1; shift ;;
        --download-wheels) DOWNLOAD="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -n "$DOWNLOAD" ]; then
    exec "$PY" "$REPO/scripts/gpu_wheels.py" "$DOWNLOAD"
fi
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
    echo "error: --wheels $WHEELS is not a folder; build it with: python scripts/gpu_wheels.py $WHEELS" >&2
    exit 2
fi
[ -n "$WHEELS" ] && WHEELS="$(cd "$WHEELS" && pwd)"

export WANDB_MODE=disabled PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    OUT="${OUT:-outputs/gpu-check/dry-run-$(date +%Y-%m-%d_%H-%M-%S)}"
else
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: torch sees no CUDA GPU here; run with --dry-run for the CPU rehearsal" >&2
        exit 2
    fi
    DEVICE=cuda
    GPU_SLUG="$("$PY" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")"
    OUT="${OUT:-results/gpu/$GPU_SLUG}"
fi
mkdir -p "$OUT/logs" || { echo "error: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
STEPS_TSV="$OUT/steps.tsv"
printf 'step\tstatus\trc\tseconds\tcommand\n' > "$STEPS_TSV"
FAILED=0

# step NAME SECONDS CMD...: run CMD under `timeout`, stream and log its output, record the outcome.
step() {
    local name="$1" limit="$2"; shift 2
    local log="$OUT/logs/$name.log" t0=$SECONDS rc status
    echo "== $name (at most ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    [ "$status" = ok ] || FAILED=1
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$*" >> "$STEPS_TSV"
    echo "== $name: $status (rc $rc, $((SECONDS - t0))s)"
    return 0
}

# -- 0. setup: provenance, then the package and its missing pure-Python dependencies -----------
{ command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"; } > "$OUT/nvidia-smi.txt" 2>&1
DRIVER="$(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 || echo none)"

# esam runs from this checkout, whatever else is installed (an install elsewhere, or none: the
# machine's Python may not be the 3.11 pyproject.toml asks for).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
missing() {  # the pip names of what the check imports and this Python lacks
    "$PY" - <<'EOF'
import importlib.util
need = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime",
        "submitit": "submitit", "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher",
        "yaml": "PyYAML", "pytest": "pytest", "tqdm": "tqdm"}  # tqdm: the trainer's progress bar
def absent(mod):
    try:
        return importlib.util.find_spec(mod) is None
    except ImportError:  # the parent of a dotted name is missing
        return True
print(" ".join(pkg for mod, pkg in need.items() if absent(mod)))
EOF
}
MISSING="$(missing)"
if [ -n "$MISSING" ]; then
    if [ -z "$WHEELS" ]; then
        echo "error: missing $MISSING; build a wheel folder with python scripts/gpu_wheels.py DIR and pass --wheels DIR" >&2
        exit 2
    fi
    "$PY" -c "import torch; print(f'torch=={torch.__version__}')" > "$OUT/constraints.txt"
    # Only DIR is looked in (no index, no pip configuration's extra links); what is installed
    # already (torch, PyYAML, packaging, ...) satisfies the rest.
    step install-deps 300 env PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --no-index --find-links "$WHEELS" \
        --only-binary=:all: -c "$OUT/constraints.txt" $MISSING
    MISSING="$(missing)"
    if [ -n "$MISSING" ]; then
        echo "error: still missing $MISSING after installing from $WHEELS (see $OUT/logs/install-deps.log)" >&2
        exit 2
    fi
fi

"$PY" - "$OUT/env.json" "$DEVICE" "$DRIVER" "$COMMAND" "$DRY" <<'EOF'
import json, platform, sys, time
import torch
from esam.runtime import device_name, git_commit
path, device, driver, command, dry = sys.argv[1:]
dev = torch.device(device)
json.dump({"device": device, "device_name": device_name(dev), "driver": driver, "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
           "git_commit": git_commit(), "command": command, "dry_run": dry == "1",
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, open(path, "w"), indent=1)
EOF
cat "$OUT/env.json"

if [ -z "$METHODS" ]; then
    METHODS="$("$PY" -c "from esam.bench import registered_options as r; o = r(); print(','.join([m for m in ('sgd', 'sam', 'esam') if m in o] + [m for m in o if m not in ('sgd', 'sam', 'esam')]))")"
fi
BENCH_METHODS="$METHODS"
case ",$METHODS," in *,sam,*) BENCH_METHODS="$BENCH_METHODS,sam_m64" ;; esac
case ",$METHODS," in *,esam,*) BENCH_METHODS="$BENCH_METHODS,esam_m64" ;; esac
echo "methods: $METHODS (bench: $BENCH_METHODS)"

# -- sizes: the real check, its --quick form, or the CPU rehearsal ---------------------------
if [ "$DRY" = 1 ]; then
    # Tiny and CPU-only: resnet_digits on 8x8 synthetic images stands in for both networks, at
    # the real batch sizes (m=64 must divide them).
    R18=(model=resnet_digits dataset.image_size=8 dataset.num_train=128 dataset.batch_size=128)
    WRN=(model=resnet_digits dataset.image_size=8 dataset.num_train=256 dataset.batch_size=256)
    BENCH_SIZE=(device=cpu num_threads=1 steps=1 repeats=1 warmup_steps=1 phase_steps=1 flop_steps=1 num_batches=1 plot=false)
    PIPE=(--device cpu --model resnet_digits --batch-size 16 --steps 1 --rounds 2 --num-threads 1
          --set dataset.image_size=8 --set dataset.num_train=64 --set dataset.num_test=16 --min-pct 0)
    TRAIN=(model=resnet_digits dataset.image_size=8 dataset.num_train=64 dataset.num_test=32
           dataset.batch_size=16 trainer.device=cpu trainer.num_threads=1)
    T_TEST=120 T_BENCH=120 T_WRN=120 T_PIPE=120 T_TRAIN=60
else
    R18=(model=resnet18 dataset.batch_size=128)
    WRN=(model=wrn28_10 dataset.batch_size=256)
    if [ "$QUICK" = 1 ]; then
        BENCH_SIZE=(device=cuda steps=4 repeats=6 warmup_steps=3 phase_steps=2 flop_steps=5)
        PIPE=(--steps 20 --rounds 3)
    else
        BENCH_SIZE=(device=cuda steps=5 repeats=12 warmup_steps=5 phase_steps=3 flop_steps=10)
        PIPE=(--steps 40 --rounds 5)
    fi
    PIPE+=(--device cuda --model resnet18 --batch-size 128 --min-pct 95)
    TRAIN=(model=resnet18 dataset.batch_size=128 dataset.num_train=2560 dataset.num_test=1000 trainer.device=cuda)
    T_TEST=300 T_BENCH=240 T_WRN=360 T_PIPE=240 T_TRAIN=120
fi

# -- 1. the CUDA-marked tests ---------------------------------------------------------------
step tests "$T_TEST" "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$OUT/tests.xml" tests/test_cuda.py

# -- 2. the overhead bench ------------------------------------------------------------------
bench() {  # bench NAME SECONDS OVERRIDES...
    local name="$1" limit="$2"; shift 2
    local tag=()
    [ "$DRY" = 1 ] && tag=("tag=$name")  # the dry run uses one tiny model for all three
    step "bench-$name" "$limit" "$PY" -m esam.bench "$@" "${BENCH_SIZE[@]}" ${tag[@]+"${tag[@]}"} "methods=[$BENCH_METHODS]" \
        "results_dir=$OUT/bench" "hydra.run.dir=$OUT/hydra/bench-$name"
}
bench resnet18-bf16 "$T_BENCH" "${R18[@]}" precision=bf16
bench resnet18-tf32 "$T_BENCH" "${R18[@]}" precision=tf32
bench wrn28_10-bf16 "$T_WRN" "${WRN[@]}" precision=bf16

# -- 3. trainer vs bench --------------------------------------------------------------------
step pipeline "$T_PIPE" "$PY" -m esam.bench.pipeline "${PIPE[@]}" --precision bf16 \
    --out "$OUT/pipeline/trainer-vs-bench-$DEVICE-bf16"

# -- 4. a 2-epoch synthetic CIFAR-shaped run per method -------------------------------------
for m in ${METHODS//,/ }; do
    step "train-$m" "$T_TRAIN" "$PY" -m esam.train dataset=synthetic "${TRAIN[@]}" "optimizer=$m" trainer.epochs=2 \
        trainer.progress=false logger=none "hydra.run.dir=$OUT/train/$m"
done

# -- summary ----------------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF'
import csv, json, sys
from pathlib import Path
import pandas as pd
from esam.bench.tables import markdown

out = Path(sys.argv[1])
env = json.loads((out / "env.json").read_text())
lines = [f"# GPU check: {env['device_name']}", "",
         f"`{env['command']}`: driver {env['driver']}, torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), "
         f"commit {env['git_commit'][:12]}, started {env['started']}" + (" (CPU dry run, tiny sizes)" if env["dry_run"] else ""),
         "", "## Steps", "", markdown(pd.read_csv(out / "steps.tsv", sep="\t").drop(columns="command")), ""]
cols = ["method", "stat", "ms_step", "images_per_s", "extra_pct", "extra_flops_pct", "cost_model_extra_pct",
        "cost_measured_extra_pct"]
for f in sorted((out / "bench").glob("*.csv")):
    lines += [f"## Bench {f.stem}", "", markdown(pd.read_csv(f)[cols]), ""]
for f in sorted((out / "pipeline").glob("*.md")):
    lines += [f.read_text(), ""]
rows = []
for s in sorted((out / "train").glob("*/summary.json")):
    d = json.loads(s.read_text())
    rows.append({k: d.get(k) for k in ("method", "optimizer", "epochs", "train_loss_final", "test_acc_final",
                                       "img_per_s", "step_ms", "precision", "device_name")})
if rows:
    lines += ["## 2-epoch synthetic runs", "", markdown(pd.DataFrame(rows)), ""]
(out / "summary.md").write_text("\n".join(lines))
print(f"wrote {out / 'summary.md'}")
EOF
echo "gpu check: $( [ $FAILED = 0 ] && echo 'every step passed' || echo 'some steps failed, see steps.tsv and logs/' ) -> $OUT"
exit $FAILED
