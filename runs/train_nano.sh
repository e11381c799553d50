#!/usr/bin/env bash
# Train the built-in nano model from scratch on a CPU with the ordinary training command, then evaluate it.
#   bash runs/train_nano.sh [OUT]        (OUT defaults to runs/nano; ~7 GB of data; hours on 2 cores)
# Rerunning the script resumes where it stopped (each stage continues from its last checkpoint).
set -euo pipefail
OUT=${1:-runs/nano}
N=${N:-20000}                  # items per task in the train split
export OMP_WAIT_POLICY=PASSIVE # yield the cores when another process competes for them
mkdir -p "$OUT"

# 1. data: the train split of the Synthetic Visual World (no hexagons), in the reference fine-tuning format
[ -f "$OUT/data/meta.json" ] || internvl synth --out "$OUT/data" --split train --n "$N"

# 2. a byte-level BPE tokenizer trained on the split's text, and the nano config.json (original layout)
[ -f "$OUT/init/config.json" ] || python -m internvl.train.nano prepare --data "$OUT/data" --out "$OUT/init"

# 3. the curriculum: one large shape (stage 0), one or two mid-sized (stage 1a), up to five at the contract's
#    sizes mixed with the split (stage 1); shapes.json holds only the shape questions of stage 0's scenes
[ -f "$OUT/curriculum/stage1a.json" ] || python -m internvl.train.nano curriculum --split "$OUT/data" --out "$OUT/curriculum"

# 4. the vision encoder, pretrained on per-patch targets drawn from the generator (~26 min), then frozen
[ -f "$OUT/vit/vit_pretrain.json" ] || python -m internvl.train.nano vit --init "$OUT/init" --out "$OUT/vit" \
    --data "$OUT/vit_data.npz" --steps 1200 --images 20000

# 5. the language stages, each from the last one's final weights (~12 + 16 + 42 min, then ~4 h for stage 1):
#    shapes only (the skill the model otherwise learns last), single large shapes, one or two, the mixture
prev="$OUT/vit"
for stage in shapes:nano-shapes stage0:nano-stage0 stage1a:nano-stage1a stage1:nano; do
  name=${stage%%:*}; config=configs/train/${stage##*:}.yaml
  [ -f "$OUT/$name/final/config.json" ] || internvl finetune "$prev" --data "$OUT/curriculum/$name.json" \
      --config "$config" --out "$OUT/$name" --resume
  prev="$OUT/$name/final"
done

# (optional, not in the shipped model) the full dynamic tiling, from those weights
if [ "${STAGE2:-0}" = 1 ]; then
  [ -f "$OUT/stage2/final/config.json" ] || internvl finetune "$prev" --data "$OUT/data/meta.json" \
      --config configs/train/nano-stage2.yaml --out "$OUT/stage2" --resume
  FINAL="$OUT/stage2/final"
else
  FINAL="$prev"
fi

# 6. the benchmark: per-task accuracy on the test split (200 items per task), greedy
internvl eval synthetic "$FINAL" --n 200 --out "$OUT/eval"
