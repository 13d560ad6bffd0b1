#!/usr/bin/env bash
# Every GPU figure of issue 12 ("Targets" -> GPU) in one go, written to $OUT (default /tmp/gpu-bench):
#   tf32-check.json     hard sub-batch vs masked outputs, ResNet-110-sized dsn, TF32 off: max relative difference
#   bench-r20.json      `bench` at ResNet-20 size (depth_n 3), batches $BENCH_SIZES: open vs dual (time, aten ops,
#                       kernels), hard vs masked, achieved share of the ideal saving (batch 1 = latency)
#   bench-r110.json     the same at ResNet-110 size (depth_n 18, width 16), without the attack overhead
#   c100-metrics.csv    `train --config configs/cifar100.toml --dataset synthetic --epochs $C100_EPOCHS`
#   summary.json        each step's wall seconds and exit status, and the headline figures read from the above
#   log.txt             everything printed
# Steps run most-needed first; each runs under `timeout`, capped by what is left of $TOTAL seconds, so one slow
# step cannot eat the others (a step with under 15 s left is skipped and marked so in summary.json).
#
# On the GPU machine (torch there, but not torchattacks, foolbox, eagerpy, GitPython, gitdb, smmap): bring their
# wheels in .whl/ (see /work/.library/device/README.md: `echo /.whl/ >> .git/info/exclude`, then
# `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#  --platform manylinux2014_x86_64 -d .whl torchattacks==V foolbox==V eagerpy==V GitPython==V gitdb==V smmap==V`,
# the versions of .venv/bin/pip list), carry .whl, and run `OUT=$OUT scripts/gpu-bench.sh`: this script installs
# .whl/*.whl into /tmp/site itself and puts the project on PYTHONPATH.
#
# A check on a CPU first (tiny sizes, one thread, about 3-4 minutes on a busy 2-core machine):
#   DEVICE=cpu TINY=1 OUT=/tmp/gpu-bench-cpu scripts/gpu-bench.sh
set -uo pipefail
OUT="${OUT:-/tmp/gpu-bench}"
DEVICE="${DEVICE:-cuda}"
TINY="${TINY:-0}"
PY="${PYTHON:-python3}"
TOTAL="${TOTAL:-570}"                       # seconds for all steps together (a device command may run 600)
if [ "$TINY" = 1 ]; then
  BENCH_SIZES="${BENCH_SIZES:-1,8}"; BENCH_REPEATS="${BENCH_REPEATS:-2}"; R110_DEPTH="${R110_DEPTH:-2}"
  R110_WIDTH="${R110_WIDTH:-4}"; ATTACK_N="${ATTACK_N:-16}"; C100_EPOCHS="${C100_EPOCHS:-1}"
  CW_STEPS="${CW_STEPS:-10}"; CW_BINARY_STEPS="${CW_BINARY_STEPS:-2}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  BENCH_SIZES="${BENCH_SIZES:-1,256,2048}"; BENCH_REPEATS="${BENCH_REPEATS:-5}"; R110_DEPTH="${R110_DEPTH:-18}"
  R110_WIDTH="${R110_WIDTH:-16}"; ATTACK_N="${ATTACK_N:-1000}"; C100_EPOCHS="${C100_EPOCHS:-15}"
  # foolbox's CW defaults to 9 searches x 1000 Adam steps: ~9000 forward-backward passes per routing gradient,
  # far beyond 2 minutes for 1,000 images of a ResNet-110-sized dsn; the attack step sizes it down (recorded)
  CW_STEPS="${CW_STEPS:-100}"; CW_BINARY_STEPS="${CW_BINARY_STEPS:-5}"
fi
ROOT="$(pwd)"
WORK="$(mktemp -d)"
STEPS="$WORK/steps.tsv"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$ROOT:${PYTHONPATH:-}"
CLI=("$PY" -m robustness)
DEADLINE=$(( $(date +%s) + TOTAL ))
THREADS=()
[ "$DEVICE" = cpu ] && THREADS=(--threads 1)

log() { echo "$*" | tee -a "$OUT/log.txt"; }
# step NAME LIMIT_S CMD...: run CMD under timeout (LIMIT_S, or less if the total budget is nearly spent);
# with STDOUT_TO=FILE its stdout goes to FILE instead of the log
step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  (( limit > left )) && limit=$left
  if (( limit < 15 )); then
    log "== $name: skipped ($left s of the total left)"; printf '%s\tskipped\t0\n' "$name" >> "$STEPS"; return
  fi
  log "== $name (limit ${limit}s): $*"
  local start rc
  start=$(date +%s.%N)
  if [ -n "${STDOUT_TO:-}" ]; then
    timeout --kill-after=10 "$limit" "$@" > "$STDOUT_TO" 2> "$WORK/stderr"
    rc=$?
    grep -v '^USDT:' "$WORK/stderr" | tee -a "$OUT/log.txt"
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v '^USDT:' | tee -a "$OUT/log.txt"
    rc=${PIPESTATUS[0]}
  fi
  local wall; wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  log "== $name: exit $rc after ${wall}s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$wall" >> "$STEPS"
}
# derive IN OUT section.key=value...: a copy of a TOML config with some top-level keys of its tables replaced
derive() {
  "$PY" - "$@" <<'PYEOF'
import re, sys
src, dst, *pairs = sys.argv[1:]
want = {tuple(p.split("=", 1)[0].split(".", 1)): p.split("=", 1)[1] for p in pairs}
section, lines, seen = None, [], set()
for line in open(src).read().splitlines():
    header = re.match(r"\s*\[([^\]]+)\]", line)
    if header:
        section = header.group(1).strip()
    key = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
    if key and (section, key.group(1)) in want:
        line = f"{key.group(1)} = {want[(section, key.group(1))]}"
        seen.add((section, key.group(1)))
    lines.append(line)
missing = set(want) - seen
assert not missing, f"not in {src}: {missing}"
open(dst, "w").write("\n".join(lines) + "\n")
PYEOF
}

log "gpu-bench: DEVICE=$DEVICE TINY=$TINY sizes $BENCH_SIZES, ResNet-110 as depth_n $R110_DEPTH width $R110_WIDTH, \
attack n $ATTACK_N, cifar100 epochs $C100_EPOCHS, total budget ${TOTAL}s"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT/log.txt"

# 1. hard sub-batch vs masked outputs with TF32 off (the attack evaluation's precision)
step tf32-check 60 "$PY" scripts/subbatch_vs_masked.py "$DEVICE" "$R110_DEPTH" "$R110_WIDTH" "$OUT/tf32-check.json"

# 2. the skipping benchmark at ResNet-20 and ResNet-110 size (--json-only: stdout is the JSON)
bench() {  # bench NAME LIMIT ARGS...
  local name="$1" limit="$2"; shift 2
  STDOUT_TO="$OUT/$name.json" step "$name" "$limit" "${CLI[@]}" bench --skip 0.5 --device "$DEVICE" \
    --batch-size "$BENCH_SIZES" --repeats "$BENCH_REPEATS" "${THREADS[@]}" --json-only "$@"
}
bench bench-r20 90 --depth-n 3 --width 16
bench bench-r110 150 --depth-n "$R110_DEPTH" --width "$R110_WIDTH" --no-attack-overhead

# 3. an attack of ATTACK_N images (FGSM, PGD-20, CW; both libraries; routing gradients none and bpda) on a
#    ResNet-110-sized dsn trained one epoch on synthetic data; only the attack is timed
derive configs/quickstart.toml "$WORK/r110.toml" data.n=2000 data.test_limit="$ATTACK_N" train.epochs=1 \
  train.warmup_epochs=1 train.ramp_epochs=0 train.batch_size=128 train.device="\"$DEVICE\"" attack.device="\"$DEVICE\""
step r110-train 90 "${CLI[@]}" train --config "$WORK/r110.toml" --model dsn --depth-n "$R110_DEPTH" \
  --width "$R110_WIDTH" --device "$DEVICE" --out "$WORK/r110" --no-progress
step r110-attack 180 "${CLI[@]}" attack "$WORK/r110" --attacks fgsm,pgd,cw --backend both --gate-grad none,bpda \
  --eps 8/255 --n "$ATTACK_N" --batch-size auto --device "$DEVICE" --set pgd.steps=20 --set pgd.restarts=1 \
  --set cw.steps="$CW_STEPS" --set cw.binary_steps="$CW_BINARY_STEPS" "${THREADS[@]}" --no-progress

# 4. the quickstart pipeline (dsn, dual, resnet: train, attack, report) on the device
QS_CONFIG=configs/quickstart.toml
if [ "$TINY" = 1 ]; then
  QS_CONFIG="$WORK/qs.toml"
  derive configs/quickstart.toml "$QS_CONFIG" data.n=200 data.test_limit=50 train.epochs=1 train.warmup_epochs=0 \
    train.ramp_epochs=0 attack.n=8 attack.batch_size=8 attack.workers=1 run.workers=1 attack.eps="[0.01, 0.03]"
fi
step quickstart 120 "${CLI[@]}" run --config "$QS_CONFIG" --device "$DEVICE" --out "$WORK/qs" --no-progress

# 5. the paper-scale recipe on synthetic data: does it leave chance, and how fast does the dsn train
C100_CONFIG=configs/cifar100.toml
if [ "$TINY" = 1 ]; then
  C100_CONFIG="$WORK/c100.toml"
  derive configs/cifar100.toml "$C100_CONFIG" model.depth_n=2 model.width=4 train.warmup_epochs=0 \
    train.ramp_epochs=0 train.lr_warmup_epochs=0
  C100_DATA=(--batch-size 64)
else
  # the 200-epoch schedule cut to C100_EPOCHS: gates open for 2 epochs, losses ramped over 3, lr steps at 8 and 12
  # (the config's 10 + 10 warm-up and ramp and its milestones at 100 and 150 would leave no trained gates at 15)
  C100_CONFIG="$WORK/c100.toml"
  derive configs/cifar100.toml "$C100_CONFIG" train.warmup_epochs=2 train.ramp_epochs=3 train.milestones="[8, 12]"
  C100_DATA=()
fi
step c100-train 200 "${CLI[@]}" train --config "$C100_CONFIG" --dataset synthetic --epochs "$C100_EPOCHS" \
  --device "$DEVICE" --out "$WORK/c100" --no-progress "${C100_DATA[@]}"
cp "$WORK/c100/metrics.csv" "$OUT/c100-metrics.csv" 2>/dev/null

# the headline figures, read back from what the steps wrote
SETTINGS="device=$DEVICE tiny=$TINY bench_sizes=$BENCH_SIZES bench_repeats=$BENCH_REPEATS r110_depth_n=$R110_DEPTH \
r110_width=$R110_WIDTH attack_n=$ATTACK_N attack_eps=8/255 pgd_steps=20 pgd_restarts=1 cw_steps=$CW_STEPS \
cw_binary_steps=$CW_BINARY_STEPS c100_epochs=$C100_EPOCHS c100_schedule=warmup2,ramp3,milestones8+12 total_budget_s=$TOTAL"
"$PY" - "$OUT" "$STEPS" "$WORK" "$SETTINGS" <<'PYEOF' 2>&1 | tee -a "$OUT/log.txt"
import csv, json, os, sys
out, steps_file, work, settings = sys.argv[1:]
summary = {"settings": dict(kv.split("=", 1) for kv in settings.split()), "steps": {}}
for line in open(steps_file):
    name, rc, wall = line.rstrip("\n").split("\t")
    summary["steps"][name] = {"exit": rc, "seconds": float(wall)}

def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None

for name in ("bench-r20", "bench-r110"):
    bench = load(os.path.join(out, f"{name}.json"))
    if bench:
        summary[name] = {b["batch_size"]: {
            "open_vs_dual_time": b["open_vs_dual_time"], "open_vs_dual_aten_ops": b["open_vs_dual_aten_ops"],
            "hard_vs_masked_time": b["hard_vs_masked_time"], "achieved_of_ideal": b["ideal"]["achieved_of_ideal"],
            "kernels": {t["variant"]: t["kernels"] for t in b["timings"]},
            "host_syncs": {t["variant"]: t["host_syncs"] for t in b["timings"]},
            "targets": b["targets"]} for b in bench["batches"]}
summary["tf32_check"] = load(os.path.join(out, "tf32-check.json"))
rows = list(csv.DictReader(open(os.path.join(out, "c100-metrics.csv")))) if os.path.exists(
    os.path.join(out, "c100-metrics.csv")) else []
if rows:
    config = load(os.path.join(work, "c100", "config.json")) or {}
    n = int((config.get("data_options") or {}).get("n") or config.get("train_limit") or 10000)
    seconds = [float(r["seconds"]) for r in rows[1:] or rows]  # epoch 1 pays cuDNN autotuning
    last = rows[-1]
    summary["c100"] = {"epochs": len(rows), "train_images": n,
                       "images_per_s_incl_eval": n * len(seconds) / sum(seconds),
                       "test_acc_fine": float(last["test_acc_fine"] or "nan"),
                       "test_acc_coarse": float(last["test_acc_coarse"] or "nan"),
                       "gated_macs_saved": float(last["gated_macs_saved"] or "nan")}
targets = {
    "quickstart run <= 60 s": summary["steps"].get("quickstart", {}).get("seconds"),
    "attack <= 120 s": summary["steps"].get("r110-attack", {}).get("seconds"),
}
summary["timed_targets_seconds"] = targets
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
PYEOF
rm -rf "$WORK"
log "gpu-bench: finished; figures in $OUT/summary.json"
