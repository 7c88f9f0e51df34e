#!/usr/bin/env bash
# padkd's GPU check, for a short slot on one GPU: every step bounded by `timeout` within one budget (480 s).
#
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--wheels DIR] [--torchdistill-script PATH]
#
# Steps: set-up; the tests marked `cuda`; a teacher trained in fp32 on generated CIFAR-100 files; PAD-L2 (two
# stages) under bf16 and under fp16 autocast with the gradient scaler; KD under torchrun with one process that
# joins an NCCL process group; KD with torch.compile; benchmarks/speed.py --device cuda (padkd's KD epoch against
# the student trained alone, against torchdistill when installed and --torchdistill-script is given, peak CUDA
# memory). Writes DIR/summary.json, DIR/summary.md and DIR/gpu_check.log (default DIR: gpu-check).
#
# Set-up: PADKD_PYTHON (default python3) runs everything, with this checkout's src/ on PYTHONPATH (no install of
# padkd itself). Requirements it lacks are pip-installed into it, from --wheels DIR alone when given (for machines
# without network); installed ones outside the declared ranges are used as they are and noted in the summary.
# --dry-run runs the same steps on the CPU with tiny sizes (resnet8 models, 32 images; budget 1200 s), installs
# nothing, and says which parts need CUDA (the cuda tests skip, gloo stands in for NCCL, compile uses the eager
# backend, no peak CUDA memory). A step that no longer fits the budget is skipped, and the summary says so.
# Exit status: 0 when no step failed or timed out, 1 otherwise, 2 for bad arguments.
set -uo pipefail

USAGE="benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--wheels DIR] [--torchdistill-script PATH]"
usage() { echo "usage: $USAGE" >&2; }
bad() { echo "gpu_check.sh: $*; usage: $USAGE" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=gpu-check DRY=0 BUDGET="" WHEELS="" TD_SCRIPT=""
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) [[ $# -ge 2 ]] || bad "--out needs a folder"; OUT=$2; shift ;;
        --budget) [[ ${2:-} =~ ^[0-9]+$ ]] || bad "--budget needs whole seconds, got '${2:-}'"; BUDGET=$2; shift ;;
        --wheels) [[ -d ${2:-} ]] || bad "--wheels: '${2:-}' is not a folder of wheel files"; WHEELS=$(cd "$2" && pwd)
                  shift ;;
        --torchdistill-script) [[ -f ${2:-} ]] || bad "--torchdistill-script: '${2:-}' is not a file"
                               TD_SCRIPT=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) bad "unknown argument '$1'" ;;
    esac
    shift
done
mkdir -p "$OUT" || bad "cannot create --out '$OUT'"
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/gpu_check.log STEPS=$WORK/steps.tsv
: >"$LOG"
: >"$STEPS"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PADKD_PYTHON:-python3}
HELPER=$REPO/benchmarks/gpu_steps.py
RESERVE=30  # seconds kept for the summary, which runs even when the budget is spent
START=$SECONDS
TOOK=0

if ((DRY)); then
    BUDGET=${BUDGET:-1200}  # a shared CPU is slower than the GPU the 480 s are planned for
    MODE=dry-run DEVICE=cpu TEACHER=resnet8 STUDENT=resnet8 IMAGES=32 TEST=16 BATCH=16 BACKEND=gloo
    SPEED=(--images 32 --test-images 16 --batch 16 --epochs 2 --rounds 1 --threads 1 --best engine.channels_last=true)
    COMPILE=(engine.compile=true engine.compile_backend=eager)
else
    BUDGET=${BUDGET:-480}
    MODE=gpu DEVICE=cuda TEACHER=resnet56 STUDENT=resnet20 IMAGES=2560 TEST=256 BATCH=64 BACKEND=nccl
    SPEED=(--images 6400 --test-images 64 --batch 64 --epochs 3 --rounds 2 --workers 4)
    COMPILE=(engine.compile=true)
fi
COMMON=(data.batch_size=$BATCH data.eval_batch_size=$BATCH "device=$DEVICE" "records.splits=[]"
        log.tensorboard=false log.progress=none)

say() { echo "[gpu_check] $*" | tee -a "$LOG" >&2; }
record() {  # record NAME STATUS SECONDS DETAIL: one row of the summary
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$STEPS"
    say "$1: $2 ($3 s)${4:+: $4}"
}
bounded() {  # bounded CAP CMD...: CMD (output to the log) under timeout min(CAP, time left); sets TOOK
    local left=$((BUDGET - (SECONDS - START) - RESERVE))
    ((left >= 20)) || return 125
    local limit=$((${1} < left ? ${1} : left)) t0=$SECONDS rc
    shift
    echo "+ $* (at most $limit s)" >>"$LOG"
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    TOOK=$((SECONDS - t0))
    return $rc
}
finish() {  # finish NAME RC DETAIL: the row of a bounded step from its exit status
    case $2 in
        0) record "$1" pass "$TOOK" "$3" ;;
        124 | 137) record "$1" timeout "$TOOK" "stopped at its time limit; see gpu_check.log" ;;
        125) record "$1" skip 0 "budget spent ($((SECONDS - START)) s of $BUDGET s)" ;;
        *) record "$1" fail "$TOOK" "exit status $2; see gpu_check.log" ;;
    esac
}
train() {  # train NAME CAP [HELPER OPTIONS] CONFIG [OVERRIDE ...]: one checked padkd run (gpu_steps.py train)
    local name=$1 cap=$2
    shift 2
    bounded "$cap" "$PY" "$HELPER" train --run-dir "$WORK/runs/$name" --result "$WORK/$name.result.json" "$@" \
        "data.root=$WORK/data" "${COMMON[@]}"
    finish "$name" $? ""
}
passed() { grep -q "^$1"$'\t'"pass"$'\t' "$STEPS"; }

# ---------------------------------------------------------------- set-up
setup() {
    local t0=$SECONDS missing notes installed="" versions
    if ! command -v "$PY" >/dev/null; then
        record setup fail 0 "no interpreter '$PY'; set PADKD_PYTHON"
        return 1
    fi
    mapfile -t missing < <(timeout 60 "$PY" "$HELPER" missing 2>"$WORK/notes.txt")
    if ((${#missing[@]})); then
        if ((DRY)); then
            record setup fail $((SECONDS - t0)) "missing ${missing[*]} (a dry run installs nothing)"
            return 1
        fi
        say "installing ${missing[*]}${WHEELS:+ from $WHEELS}"
        bounded 240 "$PY" -m pip install -q ${WHEELS:+--no-index --find-links "$WHEELS"} "${missing[@]}"
        mapfile -t missing < <(timeout 60 "$PY" "$HELPER" missing 2>"$WORK/notes.txt")
        if ((${#missing[@]})); then
            record setup fail $((SECONDS - t0)) "could not install ${missing[*]}; pass --wheels DIR on an offline machine"
            return 1
        fi
        installed="installed the missing requirements; "
    fi
    notes=$(sed 's/^note: //' "$WORK/notes.txt" | paste -sd ';' -)
    # padkd imports, and the generated CIFAR-100 files are written (prints torch's version and whether it sees a GPU)
    if ! versions=$(timeout 120 "$PY" "$HELPER" data "$WORK/data" "$IMAGES" "$TEST" 2>>"$LOG"); then
        record setup fail $((SECONDS - t0)) "padkd does not import or the data could not be written; see gpu_check.log"
        return 1
    fi
    if [[ $versions != *True ]] && ((!DRY)); then
        record setup fail $((SECONDS - t0)) "torch ${versions% *} sees no GPU; --dry-run checks this script on the CPU"
        return 1
    fi
    record setup pass $((SECONDS - t0)) "${installed}torch ${versions% *} (sees a GPU: ${versions#* }), $IMAGES generated CIFAR-100 images${notes:+; $notes}"
}

# ---------------------------------------------------------------- the steps
cuda_tests() {
    local files
    mapfile -t files < <(grep -l "pytest.mark.cuda\b" "$REPO"/tests/test_*.py)
    if ((!${#files[@]})); then
        record cuda_tests fail 0 "no test in tests/ is marked cuda"
        return
    fi
    bounded 180 "$PY" -m pytest -p no:cacheprovider -rs -m cuda "${files[@]}"
    local rc=$? last
    last=$(grep -E "[0-9]+ (passed|skipped|failed|errors?|deselected).* in [0-9.]+s" "$LOG" | tail -1 | tr -d '=' |
        sed 's/^ *//; s/ *$//')
    if ((rc == 0)) && [[ $last != *passed* ]]; then
        record cuda_tests skip "$TOOK" "needs CUDA: $last"
    else
        finish cuda_tests $rc "$last"
    fi
}

say "mode $MODE, budget $BUDGET s, output $OUT"
if setup; then
    cuda_tests
    train teacher 120 src/padkd/recipes/cifar100/teachers/resnet56.yaml "student.model.name=$TEACHER" stages.0.epochs=1
    DISTILL=("teacher.model.name=$TEACHER" "teacher.checkpoint=$WORK/runs/teacher" "student.model.name=$STUDENT")
    if passed teacher; then
        PAD=(src/padkd/recipes/cifar100/resnet56-resnet20/pad_l2.yaml "${DISTILL[@]}" stages.0.epochs=1 stages.1.epochs=1)
        train amp_bf16 120 "${PAD[@]}" engine.precision=bf16
        train amp_fp16 120 --expect-scaler "${PAD[@]}" engine.precision=fp16
        ((DRY)) && say "ddp: a dry run joins a gloo process group on the CPU; NCCL needs CUDA"
        bounded 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 "$HELPER" train \
            --process-group "$BACKEND" --run-dir "$WORK/runs/ddp" --result "$WORK/ddp.result.json" \
            src/padkd/recipes/cifar100/resnet56-resnet20/kd.yaml "${DISTILL[@]}" stages.0.epochs=1 "data.root=$WORK/data" \
            "${COMMON[@]}"
        finish ddp $? ""
    else
        for name in amp_bf16 amp_fp16 ddp; do record $name skip 0 "needs the teacher run, which did not pass"; done
    fi
    TORCHDISTILL=()
    if [[ -z $TD_SCRIPT ]]; then
        record torchdistill skip 0 "no --torchdistill-script PATH (examples/torchvision/image_classification.py)"
    elif ! timeout 60 "$PY" -c "import torchdistill" >>"$LOG" 2>&1; then
        record torchdistill skip 0 "torchdistill is not installed for $PY"
    else
        TORCHDISTILL=(--torchdistill-script "$TD_SCRIPT")
    fi
    ((DRY)) && say "speed: a dry run measures the CPU; peak CUDA memory needs CUDA"
    bounded 300 "$PY" "$REPO/benchmarks/speed.py" --device "$DEVICE" --skip-steps --teacher "$TEACHER" \
        --student "$STUDENT" "${SPEED[@]}" "${TORCHDISTILL[@]}" --json "$WORK/speed.json"
    finish speed $? "$(grep -E "^\((3|5)\) padkd" "$LOG" | tail -3 | paste -sd ';' -)"
    # last, as it can take what is left: speed.py's 'padkd best' compiles too, so this step may find a warm cache
    if passed teacher; then
        ((DRY)) && say "compile: a dry run uses the eager backend (inductor's code generation is the GPU run's)"
        train compile 180 src/padkd/recipes/cifar100/resnet56-resnet20/kd.yaml "${DISTILL[@]}" stages.0.epochs=2 \
            "${COMPILE[@]}"
    else
        record compile skip 0 "needs the teacher run, which did not pass"
    fi
else
    for name in cuda_tests teacher amp_bf16 amp_fp16 ddp torchdistill speed compile; do
        record $name skip 0 "set-up failed"
    done
fi
timeout -k 10 "$RESERVE" "$PY" "$HELPER" summary --out "$OUT" --steps "$STEPS" --work "$WORK" --mode "$MODE" \
    --budget "$BUDGET" --seconds $((SECONDS - START)) >>"$LOG" 2>&1
rc=$?
[[ -f $OUT/summary.md ]] && cat "$OUT/summary.md"
say "summary: $OUT/summary.json, $OUT/summary.md ($((SECONDS - START)) s)"
exit $((rc == 0 ? 0 : 1))
