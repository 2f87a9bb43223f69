#!/usr/bin/env bash
# Kill -9 a training run during epoch 2, resume it, and compare its final metrics with an
# uninterrupted run of the same recipe. Usage: bench/kill_resume_check.sh [RECIPE] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=${1:-recipes/quickstart.toml}
out=${2:-bench/out/kill_resume}
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
opts=(-o train.epochs=3 -o data.max_train_per_class=300 -o tracking.uri=sqlite:///$PWD/$out/mlflow.db)
rm -rf "$out" && mkdir -p "$out"
.venv/bin/fer run "$recipe" "${opts[@]}" --out "$out/straight" > "$out/straight.log" 2>&1

.venv/bin/fer run "$recipe" "${opts[@]}" --out "$out/killed" > "$out/killed.log" 2>&1 &
pid=$!
until [ -f "$out/killed/last.pt" ]; do sleep 0.2; done   # epoch 1 checkpointed: epoch 2 is running
sleep 2
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
echo "killed pid $pid during epoch 2; run.json: $(tr -d '\n ' < "$out/killed/run.json")"
.venv/bin/fer run --resume "$out/killed" > "$out/resumed.log" 2>&1
.venv/bin/python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
a = json.load(open(f"{out}/straight/metrics.json"))
b = json.load(open(f"{out}/killed/metrics.json"))
keys = ["accuracy", "macro_f1", "balanced_accuracy", "confusion_matrix", "best_epoch"]
for k in keys:
    print(f"{k:18s} uninterrupted={a[k]!s:.60}  resumed={b[k]!s:.60}")
same = all(a[k] == b[k] for k in keys) and a["per_class"] == b["per_class"]
print("IDENTICAL" if same else "DIFFERENT")
sys.exit(0 if same else 1)
PY
