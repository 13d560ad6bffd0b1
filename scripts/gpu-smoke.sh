#!/usr/bin/env bash
# The CUDA paths in a few minutes on a GPU machine: AMP + channels-last training, attacks (both backends, hard and
# open gates, none and bpda) on CUDA, the report, the bench at ResNet-20 and ResNet-110 size, and hard sub-batch vs
# masked outputs on CUDA with TF32 off. Writes logs and JSON to $OUT (default /tmp/gpu-smoke).
# Run from the repository root with the project importable (PYTHONPATH=. or an installed venv).
#   DEVICE=cpu EPOCHS=1 N=16 scripts/gpu-smoke.sh    # the same script on a CPU, to check it before a GPU run
set -euo pipefail
OUT="${OUT:-/tmp/gpu-smoke}"
DEVICE="${DEVICE:-cuda}"
EPOCHS="${EPOCHS:-4}"
N="${N:-64}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
run() { echo "+ $*" | tee -a "$OUT/log.txt"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }

run "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
start=$(date +%s)
run "$PY" -m robustness train --config configs/quickstart.toml --model dsn --device "$DEVICE" \
  --epochs "$EPOCHS" --out "$WORK/dsn" --no-progress
echo "train seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/log.txt"
start=$(date +%s)
run "$PY" -m robustness attack "$WORK/dsn" --config configs/quickstart.toml --device "$DEVICE" --n "$N" \
  --backend both --gate-mode hard,open --no-progress
echo "attack seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/log.txt"
run "$PY" -m robustness report "$WORK/dsn" --out "$WORK/report"
cp "$WORK/report/summary.json" "$OUT/summary.json"
cp "$WORK/dsn/metrics.csv" "$OUT/metrics.csv"
"$PY" -m robustness bench --skip 0.5 --device "$DEVICE" --batch-size 256 --json-only > "$OUT/bench-r20.json"
"$PY" -m robustness bench --skip 0.5 --device "$DEVICE" --batch-size 256 --depth-n 18 \
  --no-attack-overhead --json-only > "$OUT/bench-r110.json"
run "$PY" scripts/subbatch_vs_masked.py "$DEVICE" 18 16
rm -rf "$WORK"
echo "gpu-smoke: all steps finished" | tee -a "$OUT/log.txt"
