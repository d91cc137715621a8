#!/usr/bin/env bash
# One call of the GPU session; the device tool runs it in the checkout's root (see
# benchmarks/gpu/README.md for the whole session):
#
#   bash benchmarks/gpu/run.sh pNN [CHECK...]   store part pNN (carried as .gpuwheels/pNN), install
#                                                the payloads it completes, then run CHECKs (default:
#                                                every check not yet run whose needs are met)
#   bash benchmarks/gpu/run.sh - CHECK...        no part: run (or run again) the named checks
#   bash benchmarks/gpu/run.sh status            what is stored, installed and done; the summary
#
# Checks, in the order they run: env, precompile (started in the background, it compiles the
# speed graphs while later parts travel), train, dali, e2e, speed, resolution, loader, datawait.
#   env        GPU, driver, versions                            needs: nothing
#   precompile benchmarks/gpu/precompile.py (background)        needs: nothing
#   train      benchmarks/gpu/check_train.py                    needs: the early payload (DeepSpeed)
#   dali       benchmarks/gpu/check_dali.py                     needs: late (DALI), images
#   e2e        benchmarks/gpu/check_e2e.py (MLflow)             needs: late
#   speed      benchmarks/model_speed.py --compile, bf16        needs: precompile finished (or waits)
#   resolution benchmarks/resolution_speed.py, bf16 (eager)     needs: precompile finished (or waits)
#   loader     benchmarks/loader_speed.py --device cuda         needs: late, images, a quiet GPU
#   datawait   benchmarks/gpu/check_datawait.py                 needs: late, images, a quiet GPU
# In the last required part's call, speed/loader/datawait wait for the background compile (at most
# PRECOMPILE_WAIT s) so that no timing shares the machine with it.
#
# State lives in $FATSCALE_GPU_ROOT (default /tmp/fatscale), which survives between the calls of
# a warm machine: parts/, site/ (the installed packages, on PYTHONPATH), data/images/, logs/,
# done/, results.jsonl. Results and logs go to $OUT (at most 8 files): run.log, summary.txt,
# results.jsonl, logs.tar.gz. Every check prints `GPUCHECK name PASS|FAIL|SKIP figure`.
# Environment: DEVICE (cuda; cpu for the dry runs), TINY=1 (tiny sizes, for the dry runs),
# PYTHON (python3), GPUWHEELS (.gpuwheels), TIME_LIMIT (seconds for this call, default 540: no
# check starts after it), PRECOMPILE_WAIT (300), MODELS (fat_b0 fat_b1 fat_b2 fat_b3),
# FATSCALE_GPU_ONLY (run only these checks, for tests).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO" || exit 1
GPU=benchmarks/gpu
ROOT=${FATSCALE_GPU_ROOT:-/tmp/fatscale}
PARTS=${GPUWHEELS:-$REPO/.gpuwheels}
OUT=${OUT:-$ROOT/out}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
TIME_LIMIT=${TIME_LIMIT:-540}
PRECOMPILE_WAIT=${PRECOMPILE_WAIT:-300}
MODELS=${MODELS:-fat_b0 fat_b1 fat_b2 fat_b3}
ONLY=${FATSCALE_GPU_ONLY:-}
ALL_CHECKS="env precompile train dali e2e speed resolution loader datawait"
START=$SECONDS

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

mkdir -p "$ROOT/logs" "$ROOT/done" "$ROOT/work" "$OUT" || exit 1
export FATSCALE_GPU_RESULTS=$ROOT/results.jsonl PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$ROOT/inductor}
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}  # the same for precompile and speed
export MPLCONFIGDIR=$ROOT/work/matplotlib

say() { printf 'run.sh: %s\n' "$*"; }
elapsed() { echo $(( SECONDS - START )); }
ready() { compgen -G "$ROOT/$2/.payload-$1-*" >/dev/null; }   # payload NAME extracted into DEST
done_() { [ -f "$ROOT/done/$1" ]; }
allowed() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
record_fail() { "$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); from common import result; result(sys.argv[2], False, sys.argv[3])' \
    "$GPU" "$1" "$2" >/dev/null 2>&1 || echo "GPUCHECK $1 FAIL $2"; }
precompile_running() {
    local pid
    pid=$(cat "$ROOT/precompile.pid" 2>/dev/null) || return 1
    ! done_ precompile && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

needs_met() {  # CHECK -> whether what it needs is installed
    case $1 in
        env|precompile|speed|resolution) return 0 ;;
        train) ready early site ;;
        e2e) ready late site ;;
        dali|loader|datawait) ready late site && ready images data ;;
        *) return 1 ;;
    esac
}

sizes() {  # CHECK -> its arguments (normal or TINY)
    if [ "$TINY" = 1 ]; then
        case $1 in
            train) echo "--batch 4 --img-size 32 --steps 3" ;;
            precompile) echo "--models fat_b0 --batch 2 --infer-batch 2 --img-size 32 --backend aot_eager --jobs 2" ;;
            dali) echo "--img-size 64 --batch 4 --threads 1" ;;
            e2e) echo "--set train.epochs=1 --set data.img_size=32 --set train.batch_per_device=16 --min-top1 0" ;;
            speed) echo "--models fat_b0 --batch 2 --infer-batch 2 --img-size 32 --iters 1 --warmup 1" ;;
            resolution) echo "--models fat_b0 --batch 2 --iters 1 --warmup 1" ;;
            loader) echo "--workers 1 --batch 4 --img-size 32 --epochs 2" ;;
            datawait) echo "--replicas 2 --steps 4 --log-every 1 --threads 1 --set data.img_size=32 --set train.batch_per_device=4 --set train.val_batch_per_device=8" ;;
        esac
    else
        case $1 in
            train) echo "--batch 128 --img-size 224 --steps 6" ;;
            precompile) echo "--models $MODELS --batch 128 --infer-batch 256 --img-size 224 --jobs 8" ;;
            dali) echo "--num 1000 --img-size 224 --batch 16 --threads 4" ;;
            e2e) echo "" ;;
            speed) echo "--models $MODELS --batch 128 --infer-batch 256 --img-size 224 --compile --iters 20 --warmup 5" ;;
            resolution) echo "--models fat_b0 fat_b3 --batch 128 --iters 20 --warmup 5" ;;
            loader) echo "--workers 8 --batch 128 --img-size 224 --epochs 3" ;;
            datawait) echo "--replicas 40 --steps 70 --log-every 10 --threads 8" ;;
        esac
    fi
}

run_check() {  # NAME TIMEOUT COMMAND... : run with a time bound, log, mark done
    local name=$1 limit=$2; shift 2
    local left=$(( TIME_LIMIT - $(elapsed) ))
    if [ "$left" -lt 20 ]; then
        say "$name: not started, this call's TIME_LIMIT ($TIME_LIMIT s) is spent; run it again with: bash $GPU/run.sh - $name"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "== $name (at most $limit s; $(elapsed) s into this call)"
    local began=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$ROOT/logs/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$rc" > "$ROOT/done/$name"
    [ "$rc" = 0 ] || record_fail "run_$name" "exit $rc after $(( SECONDS - began )) s (124: timed out); log: logs/$name.log"
    say "== $name: exit $rc in $(( SECONDS - began )) s"
    return "$rc"
}

check_env() {
    local began=$SECONDS
    say "== env"
    { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv || echo "no nvidia-smi"
      echo "cores $(nproc); $(free -g 2>/dev/null | awk '/Mem:/ { print $2 " GiB memory" }'); /tmp: $(df -h /tmp | awk 'NR == 2 { print $4 " free" }')"
      "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
for name in ["torch", "triton", "timm", "numpy", "pillow", "pyyaml", "safetensors", "psutil", "packaging", "pydantic",
             "deepspeed", "nvidia-dali-cuda130", "webdataset", "mlflow-skinny", "sqlalchemy", "protobuf", "typing-extensions"]:
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} -")
import torch
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda,
      torch.cuda.get_device_name(0) if cuda else "", "bf16", cuda and torch.cuda.is_bf16_supported(),
      "nccl", torch.cuda.nccl.version() if cuda else "-")
sys.path.insert(0, "benchmarks/gpu")
from common import result
result("env", "PASS", f"torch {torch.__version__} cuda {torch.version.cuda} " + (torch.cuda.get_device_name(0) if cuda else "no GPU"))
EOF
      ls /usr/local/cuda/lib64 2>/dev/null | grep -E '^lib(nvjpeg|npp[a-z]*|cufft)\.so\.[0-9]+$' | tr '\n' ' '; echo
    } 2>&1 | tee "$ROOT/logs/env.log"
    echo 0 > "$ROOT/done/env"
    say "== env: $(( SECONDS - began )) s"
}

start_precompile() {
    [ -f "$ROOT/precompile.pid" ] && return 0
    say "== precompile: started in the background (logs/precompile.log)"
    # A new session (setsid) outlives this call on the warm machine; its exit status lands in done/.
    # The inner shell is the session's leader: its pid names the process group to stop.
    echo starting > "$ROOT/precompile.pid"
    setsid bash -c "echo \$\$ > '$ROOT/precompile.pid'; timeout --kill-after=15 900 \"\$0\" $GPU/precompile.py --device $DEVICE $(sizes precompile) > '$ROOT/logs/precompile.log' 2>&1; echo \$? > '$ROOT/done/precompile'" \
        "$PY" < /dev/null > /dev/null 2>&1 &
    local waited=0
    while [ "$(cat "$ROOT/precompile.pid")" = starting ] && [ "$waited" -lt 50 ]; do sleep 0.1; waited=$(( waited + 1 )); done
}

wait_precompile() {  # at most PRECOMPILE_WAIT s, then stop it: the timings must have the GPU alone
    precompile_running || return 0
    say "waiting for the background compile (at most $PRECOMPILE_WAIT s)"
    local waited=0
    while precompile_running && [ "$waited" -lt "$PRECOMPILE_WAIT" ]; do sleep 2; waited=$(( waited + 2 )); done
    if precompile_running; then
        say "the background compile is still running after $PRECOMPILE_WAIT s: stopping it (speed compiles the rest itself)"
        kill -TERM -- "-$(cat "$ROOT/precompile.pid")" 2>/dev/null
        sleep 2
        echo 143 > "$ROOT/done/precompile"
        record_fail precompile "stopped after waiting $PRECOMPILE_WAIT s"
    fi
    say "background compile finished ($waited s waited): $(grep '^GPUCHECK precompile ' "$ROOT/logs/precompile.log" | tail -1)"
}

loader_images() {  # the JPEG subset, each image R times (R=20; 1 when TINY): names keep the wnid prefix
    local dir=$ROOT/work/loader_images r copies=20
    [ "$TINY" = 1 ] && copies=1
    rm -rf "$dir" && mkdir -p "$dir"
    for f in "$ROOT"/data/images/*; do
        local base=${f##*/}
        for r in $(seq 1 "$copies"); do ln -s "$f" "$dir/${base%%_*}_r${r}_${base#*_}"; done
    done
    echo "$dir"
}

run_one() {  # CHECK
    case $1 in
        env) check_env ;;
        precompile) start_precompile ;;
        train) run_check train 300 "$PY" $GPU/check_train.py --device "$DEVICE" --workdir "$ROOT/work/train" $(sizes train) ;;
        dali) run_check dali 240 "$PY" $GPU/check_dali.py --device "$DEVICE" --images "$ROOT/data/images" $(sizes dali) ;;
        e2e) run_check e2e 420 "$PY" $GPU/check_e2e.py --device "$DEVICE" --workdir "$ROOT/work/e2e" $(sizes e2e) ;;
        speed)
            wait_precompile
            run_check speed 420 "$PY" benchmarks/model_speed.py --device "$DEVICE" --dtype bf16 --channels-last $(sizes speed) \
                && "$PY" $GPU/summarize.py model-speed "$ROOT/logs/speed.log" ;;
        resolution)  # images/s at 160/192/224 px and the fast recipes' projected device-hours
            wait_precompile
            run_check resolution 240 "$PY" benchmarks/resolution_speed.py --device "$DEVICE" --dtype bf16 \
                --channels-last $(sizes resolution) ;;
        loader)
            wait_precompile
            local images
            images=$(loader_images)
            run_check loader 300 "$PY" benchmarks/loader_speed.py --device "$DEVICE" --images "$images" $(sizes loader) \
                && "$PY" $GPU/summarize.py loader-speed "$ROOT/logs/loader.log" ;;
        datawait)
            wait_precompile
            run_check datawait 360 "$PY" $GPU/check_datawait.py --device "$DEVICE" --images "$ROOT/data/images" \
                --workdir "$ROOT/work/datawait" $(sizes datawait) ;;
        *) say "unknown check $1 (checks: $ALL_CHECKS)"; return 2 ;;
    esac
}

finish() {
    "$PY" $GPU/summarize.py report --out "$OUT/summary.txt" 2>&1 | sed 's/^/  /'
    [ -f "$ROOT/results.jsonl" ] && cp "$ROOT/results.jsonl" "$OUT/"
    tar -C "$ROOT" -czf "$OUT/logs.tar.gz" logs $(cd "$ROOT" && ls -d work/*/*.log work/*/run/train.log work/e2e/demo/train.log 2>/dev/null) 2>/dev/null
    say "this call: $(elapsed) s; results and logs in $OUT"
}

main() {
    [ $# -ge 1 ] || usage
    local part=$1; shift
    case $part in
        -h|--help) usage ;;
        status)
            "$PY" $GPU/packing.py receive --store "$ROOT/parts" --root "$ROOT"
            for c in $ALL_CHECKS; do printf '  %-10s %s\n' "$c" "$(cat "$ROOT/done/$c" 2>/dev/null || echo -)"; done
            precompile_running && say "the background compile is running"
            "$PY" $GPU/summarize.py report
            return 0 ;;
        -) [ $# -ge 1 ] || usage ;;
        p[0-9][0-9])
            if [ ! -d "$PARTS/$part" ]; then
                say "no part $PARTS/$part: carry it (carry: [\".gpuwheels/$part\"])"; return 2
            fi ;;
        *) say "unknown part or command: $part"; usage ;;
    esac
    local explicit=("$@") status
    if [ "$part" != - ]; then
        say "storing $part"
        status=$("$PY" $GPU/packing.py receive --store "$ROOT/parts" --root "$ROOT" "$PARTS/$part") || { say "receive failed"; return 1; }
        echo "$status"
        # nvidia/ holds the device's CUDA wheels (torch's) and the carried ones: whichever of the two
        # is a regular package would hide the other, so ours (first on PYTHONPATH) spans both.
        [ -d "$ROOT/site/nvidia" ] && printf '%s\n' '__path__ = __import__("pkgutil").extend_path(__path__, __name__)' \
            > "$ROOT/site/nvidia/__init__.py"
        [ -d "$ROOT/site" ] && { "$PY" $GPU/packing.py verify --site "$ROOT/site" --skip $GPU/wheels.txt || true; }
    else
        status=$("$PY" $GPU/packing.py receive --store "$ROOT/parts" --root "$ROOT")
    fi
    local final=0
    [[ $status == *'"missing_required": []'* ]] && final=1
    local rc=0 c
    if [ ${#explicit[@]} -gt 0 ] && [ "${explicit[0]}" != all ]; then
        for c in "${explicit[@]}"; do
            needs_met "$c" || { say "$c: its payloads are not installed yet"; rc=1; continue; }
            run_one "$c" || rc=1
        done
    else
        for c in $ALL_CHECKS; do
            allowed "$c" || continue
            if [ "$c" = precompile ]; then [ -f "$ROOT/precompile.pid" ] || done_ precompile || run_one precompile; continue; fi
            done_ "$c" && continue
            needs_met "$c" || continue
            # the timed checks: in the last required part's call (waiting for the compile), or
            # earlier once the compile has finished (speed only needs that)
            if [[ " speed loader datawait " == *" $c "* ]] && [ "$final" = 0 ] && { [ "$c" != speed ] || precompile_running || ! done_ precompile; }; then
                say "$c: later (runs once every required part is here and the background compile is done)"
                continue
            fi
            run_one "$c" || rc=1
        done
    fi
    [[ $status == *'"missing_required": []'* ]] || say "parts still to send: $(printf '%s' "$status" | sed -n 's/.*"missing_required": \[\([^]]*\)\].*/\1/p' | tr -d '"')"
    finish
    return "$rc"
}

main "$@" 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
