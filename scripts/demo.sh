#!/usr/bin/env bash
# The main job end to end on a real (bundled) dataset: write the digits as an ImageFolder,
# convert it to webdataset shards, train the tutorial CNN from the shards on 2 processes (DDP
# over gloo on CPU, NCCL on GPUs), evaluate, classify a few held-out images, predict the whole
# val split on 2 ranks to a file and write the run's evaluation report.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=demo_data/digits
SHARDS=demo_data/digits_shards
RUN=demo_digits

[ -d "$DATA/val" ] || python -m distnn.data.digits "$DATA"
# A re-run verifies the finished shards and skips them.
python -m distnn.data.shard imagefolder "$DATA" "$SHARDS" --max-count 250 --workers 2
torchrun --standalone --nproc_per_node=2 -m distnn.train --config configs/digits.yaml \
    data.root="$SHARDS" run.name="$RUN" ckpt.resume=never log.progress=lines
python - <<'PY'
import json
s = json.load(open("runs/demo_digits/summary.json"))
print(f"val top-1 {s['val_top1']:.4f}  (train loss {s['train_loss']:.4f}, {s['images_per_sec']:.0f} img/s)")
assert s["val_top1"] >= 0.95, "demo missed its 0.95 target"
PY
mapfile -t SAMPLES < <(ls "$DATA"/val/*/*.png | awk 'NR % 45 == 1' | head -8)
python -m distnn.predict --checkpoint "runs/$RUN" --topk 2 "${SAMPLES[@]}"
# The whole val split on 2 ranks to one file (every sample once), then the run's report.
torchrun --standalone --nproc_per_node=2 -m distnn.predict --checkpoint "runs/$RUN" \
    --output "runs/$RUN/val_predictions.csv"
torchrun --standalone --nproc_per_node=2 -m distnn.evaluate --checkpoint "runs/$RUN"
