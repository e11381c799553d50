#!/usr/bin/env bash
# Train the built-in nano model from scratch on a CPU with the ordinary training command, then evaluate it.
#   bash runs/train_nano.sh [OUT]        (OUT defaults to runs/nano; ~1.5 GB of data; hours on 2 cores)
# Rerunning the script resumes where it stopped (each stage continues from its last checkpoint).
# Options (environment):
#   START=DIR      start the language stages from this model folder instead of the vision stage, e.g.
#                  START=src/internvl/assets/nano STAGES=stage1b continues training the shipped model
#   STAGES="..."   the stages after the vision stage, in order (default: the shipped model's lineage, shapes stage0
#                  stage1a stage1 stage1b vit4 stage2 stage2b stage2c stage2d vit4b stage2e vit4c stage2f stage2g
#                  stage2h stage2hop stage2hop2 stage2hop3 stage2rc stage2rck stage2rc2 stage2rp stage2x stage2xc
#                  stage2m stage2o stage2p stage2q stage2r stage2s stage2t stage2u stage2w grow8 stage2y stage2z
#                  stage2zc stage2zj stage2zk stage2zl stage2zm stage2zn stage2zo stage2zp); vit4
#                  pretrains the encoder
#                  again on native-scale tiles, keeping the language model (vit4b: again, with the balanced kind
#                  loss, 4,000 steps of 10,000 images; vit4c: 1,500 more through the projector); stage2b-2g continue
#                  stage 2 on the same data (another order, lower peaks; stage2c trains the encoder's top 3 layers
#                  too, stage2d and stage2e all 6); stage2h continues on a mixture that leans on scenes of several
#                  objects (curriculum/stage2h.json); stage2hop: the same with the binding loss (attention from words
#                  naming objects to them, and from the answer to those words; run 13); stage2hop2 and stage2hop3:
#                  more of it (runs 13, 14); stage2rc: that plus heads for the first and last mention and a count
#                  head (run 15); stage2rck: that on curriculum/stage2k.json, which leans on count questions (run
#                  16); stage2rc2: that plus a second count head that weighs <img> 4 times an object (run 18, its
#                  step 900 of 1,100 went on); stage2rp: that plus place heads onto the thumbnail tokens of the
#                  first- and last-named objects (run 20; its step 900 of 1,300 shipped before and went on);
#                  stage2x: stage2rp plus the place loss (a readout of the named objects' centres at layer 5; run 21);
#                  stage2xw: the place loss at the mentions (layer 2) and the answer (layer 4) instead (run 22);
#                  stage2xc: stage2x plus the count readout (the count on a fifth direction at layer 5; run 23);
#                  stage2m: stage2xc plus the multiple-choice lookups (option -> letter, answer -> option; run 24);
#                  stage2o: stage2m plus the options' comparison (option -> the question's mentions, and a readout
#                  of whether the option is right at layer 4) on curriculum/stage2o.json (fresh count questions; run 26);
#                  stage2p: stage2o plus count heads from the count question's mention (2:1, 2:2) and the count read
#                  there at layer 3 (run 27); stage2q: stage2p plus a head from each mention onto its color word
#                  (0:0; run 28; its step 800 shipped before); stage2r: stage2q plus a second place
#                  head for the first-named object (4:0) on curriculum/stage2r.json (fresh relation and position
#                  questions, twice the relation ones; run 29: relation 74.0 but says 4, not shipped); stage2s:
#                  stage2r without its letter readout, from stage2r (run 30: relation 75.0, says 4); stage2t:
#                  stage2s with the count questions' rows of the binding and count losses weighing 4 times as much
#                  and a third count head (5:3), from stage2s (run 31); stage2u: stage2t on curriculum/stage2u.json
#                  (stage2r.json with the text-only arithmetic 4 times over), from stage2t (run 33); stage2w: stage2u
#                  plus the letter readouts (each option's own letter at layer 4, the right one at the answer at
#                  layer 5), from stage2u (run 35); grow8 (`internvl nano grow --after 5,5`: 6 -> 8 decoder layers,
#                  the new ones adding nothing until trained) then stage2y (stage2w's letter readouts a layer later
#                  each, the option lookup in layer 6; run 37) and stage2z (stage2y again, another data order; run
#                  38) and stage2zc (stage2z on curriculum/stage2zc.json, the tasks furthest below their targets 4
#                  times over; run 40; shipped before); stage2v (stage2u with the option lookup in
#                  layer 6; run 34) is stage2y's sibling, stage2zb (stage2z again, a 300-step cosine; run 39) stage2zc's;
#                  stage2zd (stage2zc plus the box and object readouts, on curriculum/stage2zd.json; run 41) and
#                  stage2ze (2zd again; run 42) continue stage2zc; stage2zf (2zd without the box readout; run 43) is stage2zd's sibling, then
#                  stage2zg (2zf on curriculum/stage2zc.json, the object readout at 0.3; run 44) and stage2zh (2zg
#                  plus the region readout: a position question's options read the cell they name; run 45);
#                  stage2zi (2zh's settings in one stage from stage2zc; run 46) and stage2zj (2zi with the
#                  mentions' place at layer 2 and the options' cell at layer 3, before MATCH; run 47, from stage2zc:
#                  shipped before); stage2zk (2zj again, another seed; run 48, shipped before);
#                  stage2zl (2zk at half the peak; run 49, shipped before); stage2zm (2zl again, another seed;
#                  run 50); stage2zn (2zm over 1,000 steps at half the peak; run 51); stage2zo (2zm's settings on
#                  curriculum/stage2zo.json, stage2zc.json plus fresh position multiple-choice questions; run 52); stage2zp
#                  (2zo at half the peak, another seed; run 53: the shipped model is its end); stage2zq (2zp again,
#                  another seed) continues it: START=src/internvl/assets/nano STAGES=stage2zq.
#                  Run 12's stage2i (the same mixture without the loss; shipped before) and stage2bind (the loss
#                  from the words only) are siblings of stage2hop.
#   STEPS_stage1=N the steps of a stage (its cosine schedule spans them; default: the stage's config)
#   IMAGES_vit4b=N the images of a vision stage (VIT4_IMAGES for vit4; vit4b and vit4c share 10,000)
#   LANG_ARGS="..." more finetune flags for every language stage, before the stage's own ARGS_ (a tiny run's
#                  smaller packs: tests/test_nano_recipe.py)
#   ARGS_stage1="--lr 5e-4"   more finetune flags for a stage (e.g. a lower peak when continuing a model);
#                  ARGS_vit4="--balance-kind" for a vision stage's `internvl nano vit`
#   COMPILE=1      torch.compile the training step of the stages after stage 1b (1.4x on 2 cores); 0: eager
#   N=6000         items per task in the train split
#   VIT_STEPS=1200 VIT_IMAGES=20000 CUR_SCALE=1 EVAL_N=200   the other sizes (a tiny run: tests/test_nano_recipe.py)
#   VIT_HELD_OUT=256  the held-out images each vision stage reports on
#   VIT_BATCH=N    images a step of every vision stage (default: `internvl nano vit`'s, 32)
#   DRY_RUN=1      print each command (one line, shell-quoted) instead of running it: the lineage's plan
# Run nothing else that uses the cores meanwhile: two processes with two OpenMP threads each on two cores
# run ~10x slower, not 2x.
set -euo pipefail
OUT=${1:-runs/nano}
N=${N:-6000}                   # items per task in the train split
STAGES=${STAGES:-"shapes stage0 stage1a stage1 stage1b vit4 stage2 stage2b stage2c stage2d vit4b stage2e vit4c stage2f
  stage2g stage2h stage2hop stage2hop2 stage2hop3 stage2rc stage2rck stage2rc2 stage2rp stage2x stage2xc stage2m
  stage2o stage2p stage2q stage2r stage2s stage2t stage2u stage2w grow8 stage2y stage2z stage2zc stage2zj
  stage2zk stage2zl stage2zm stage2zn stage2zo stage2zp"}
COMPILE=${COMPILE:-1}
export OMP_WAIT_POLICY=PASSIVE # yield the cores when another process competes for them
run() { if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
[ "${DRY_RUN:-0}" = 1 ] || mkdir -p "$OUT"

# 1. data: the train split of the Synthetic Visual World (no hexagons), in the reference fine-tuning format
[ -f "$OUT/data/meta.json" ] || run internvl synth --out "$OUT/data" --split train --n "$N"

# 2. a byte-level BPE tokenizer trained on the split's text, and the nano config.json (original layout)
[ -f "$OUT/init/config.json" ] || run internvl nano prepare --data "$OUT/data" --out "$OUT/init"

# 3. the curriculum: one large shape (stage 0), one or two mid-sized (stage 1a), up to five at the contract's
#    sizes mixed with the split (stage 1); shapes.json holds only the shape questions of stage 0's scenes
[ -f "$OUT/curriculum/stage2zo.json" ] || run internvl nano curriculum --split "$OUT/data" --out "$OUT/curriculum" \
    --scale "${CUR_SCALE:-1}"

# 4. the vision encoder, pretrained on per-patch targets drawn from the generator (~20 min; resumes from its
#    last checkpoint), then frozen
if [ -z "${START:-}" ]; then
  [ -f "$OUT/vit/vit_pretrain.json" ] || run internvl nano vit --init "$OUT/init" --out "$OUT/vit" \
      --data "$OUT/vit_data.npz" --steps "${VIT_STEPS:-1200}" --images "${VIT_IMAGES:-20000}" --resume \
      --held-out "${VIT_HELD_OUT:-256}" ${VIT_BATCH:+--batch "$VIT_BATCH"}
fi

# 5. the language stages, each from the last one's final weights (~1.5 s a step of ~22 packed samples):
#    shapes only (the skill the model otherwise learns last), single large shapes, one or two, the mixture
prev=${START:-"$OUT/vit"}
for name in $STAGES; do
  steps_var="STEPS_$name"; steps=${!steps_var:-}
  args_var="ARGS_$name"; read -r -a extra <<< "${!args_var:-}"
  fast=(); if [ "$COMPILE" = 1 ]; then case $name in stage2*|vit4b|vit4c) fast=(--compile) ;; esac; fi
  case $name in vit4*)  # the encoder again, on dynamic tiling's tiles (up to 4) and thumbnails
    images_var="IMAGES_$name"; images=${!images_var:-}
    lr=5e-4
    case $name in
      vit4) images=${images:-${VIT4_IMAGES:-6000}}; steps=${steps:-2000} ;;
      vit4b) images=${images:-10000}; steps=${steps:-4000}; extra=(--balance-kind ${extra[@]+"${extra[@]}"}) ;;
      *) images=${images:-10000}; steps=${steps:-1500}; lr=3e-4
         extra=(--balance-kind --through-projector ${extra[@]+"${extra[@]}"}) ;;
    esac
    cache="$OUT/views_$images.npz"  # the same images' views for vit4b and vit4c
    if [ "$name" = vit4 ]; then cache="$OUT/vit4_data.npz"; fi
    [ -f "$OUT/$name/vit_pretrain.json" ] || run internvl nano vit --init "$prev" --keep-weights --max-num 4 \
        --out "$OUT/$name" --data "$cache" --steps "$steps" --images "$images" --lr "$lr" \
        --held-out "${VIT_HELD_OUT:-256}" ${VIT_BATCH:+--batch "$VIT_BATCH"} --resume ${fast[@]+"${fast[@]}"} \
        ${extra[@]+"${extra[@]}"}
    prev="$OUT/$name"
    continue ;;
  esac
  case $name in grow8)  # a deeper decoder: two copies of layer 5 after it whose output projections start at zero
    [ -f "$OUT/$name/config.json" ] || run internvl nano grow "$prev" --out "$OUT/$name" --after 5,5
    prev="$OUT/$name"
    continue ;;
  esac
  case $name in shapes) config=nano-shapes ;; stage1) config=nano ;; *) config=nano-$name ;; esac
  # stage 2 trains on stage 1b's mixture, tiled; stages 2h, 2i, 2bind, 2hop* and 2rc on the binding mixture, 2rck and
  # 2rc2, 2rp, 2x, 2xw and 2xc on the binding mixture leaning on count questions too, 2m on that leaning on
  # multiple-choice questions as well, 2o, 2p and 2q on that with fresh count questions, 2r, 2s, 2t on that with fresh
  # relation and position questions too, 2u, 2w, and 2v, 2y, 2z and 2zb (after grow8) on that with the text-only
  # questions 4 times over, 2zc on that with the tasks furthest below their targets 4 times over, 2zd, 2ze and 2zf on
  # that with grounding 3 times over that, 2zg-2zn on 2zc's, 2zo-2zq on 2zc's plus fresh position multiple-choice ones
  data=$name; case $name in stage2h|stage2i|stage2bind|stage2hop*|stage2rc) data=stage2h ;;
    stage2rck|stage2rc2|stage2rp|stage2x|stage2xw|stage2xc) data=stage2k ;;
    stage2m) data=stage2m ;;
    stage2o|stage2p|stage2q) data=stage2o ;;
    stage2r|stage2s|stage2t) data=stage2r ;;
    stage2u|stage2v|stage2w|stage2y|stage2z|stage2zb) data=stage2u ;;
    stage2zc|stage2zd) data=$name ;;
    stage2ze|stage2zf) data=stage2zd ;;
    stage2zg|stage2zh|stage2zi|stage2zj|stage2zk|stage2zl|stage2zm|stage2zn) data=stage2zc ;;
    stage2zo|stage2zp|stage2zq) data=stage2zo ;;
    stage2*) data=stage1b ;; esac
  read -r -a common <<< "${LANG_ARGS:-}"
  [ -f "$OUT/$name/final/config.json" ] || run internvl finetune "$prev" --data "$OUT/curriculum/$data.json" \
      --config "configs/train/$config.yaml" --out "$OUT/$name" --resume ${steps:+--max-steps "$steps"} \
      ${fast[@]+"${fast[@]}"} ${common[@]+"${common[@]}"} ${extra[@]+"${extra[@]}"}
  prev="$OUT/$name/final"
done
FINAL="$prev"

# 6. the benchmark: per-task accuracy on the test split (200 items per task), greedy
run internvl eval synthetic "$FINAL" --n "${EVAL_N:-200}" --out "$OUT/eval"

# 7. to ship it as the built-in model (src/internvl/assets/nano, with training.json):
#    internvl nano ship "$FINAL" --summary "$OUT/eval/summary.json" --stage LAST_STAGE
