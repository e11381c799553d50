#!/usr/bin/env bash
# The training side on the built-in model (issue 20), measured in one go on a CPU, then the README's three tables:
#   1. hexagon LoRA: `synth --hexagon`, `finetune --lora-r`, eval before/after on the hexagon items and every task
#   2. MPO: build-prefs on the model's own `reasoning` samples (with truncated continuations), mpo, eval after
#   3. PRM: prm-data, a process reward model (and an outcome-only one) fine-tuned, bon vs greedy / majority /
#      ORM on reasoning and count of the test split, prm-bench (step F1)
#   bash runs/demos.sh [OUT]      (OUT defaults to runs/demos; writes OUT/times.tsv and OUT/tables.md)
# Rerunning resumes: a step whose output exists is skipped (trainings continue from their last checkpoint, evals
# from their answers). Changing a size after its step ran needs that step's output removed.
# Measured on 2 cores (AMD EPYC, AVX-512 BF16) with the defaults and ORM_STEPS=0 (OUT/times.tsv has what each
# took): data 0.5 min; base evals 8 (test split 6.3, hexagon split 1.9); LoRA 28 (1600 steps at ~1 s); its
# evals 8; build-prefs 9; MPO 16 (300 steps at ~3.1 s); its eval 5.5; prm-data 0.2; PRM 16 (1000 steps at ~1 s);
# ORM (not run) ~16; bon 10; prm-bench 2: 1 h 43 min in all. EVAL_N=100 saves ~10 min; DEMOS=lora runs one
# demo; LORA_STEPS=1100 fits the LoRA in 20 minutes (not measured at that size).
# Options (environment):
#   MODEL=src/internvl/assets/nano   the model every demo starts from (the built-in one)
#   DEMOS="lora mpo prm"             which demos run (the base eval on the test split is shared)
#   EVAL_N=200       items per task of the test-split evals (all 15 tasks; 200: the README's model table)
#   HEX_N=400 HEX_EVAL_N=100 LORA_R=16 LORA_STEPS=1600    hexagon train items per task (every task), hexagon
#                    test items per task of HEX_TASKS (those whose items can ask about the hexagon), LoRA rank, steps
#   MPO_N=600 MPO_SAMPLES=8 MPO_STEPS=300    reasoning questions sampled, answers per question, MPO steps (batch 8)
#   PRM_N=2000 PRM_STEPS=1000 ORM_STEPS=1000 BON_N=200 BON_K=8 BENCH_N=200    train items per task (reasoning,
#                    count), PRM and ORM steps (ORM_STEPS=0: the PRM reads each answer as one step instead),
#                    best-of-N items per task and candidates, prm-bench items per task of the test split
# Run nothing else that uses the cores meanwhile (two jobs of two threads on two cores run ~10x slower).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)  # the repository: configs/ and runs/demo_tables.py
OUT=${1:-runs/demos}
MODEL=${MODEL:-$HERE/src/internvl/assets/nano}
DEMOS=${DEMOS-"lora mpo prm"}  # may be empty: only the base eval
EVAL_N=${EVAL_N:-200}
HEX_N=${HEX_N:-400} HEX_EVAL_N=${HEX_EVAL_N:-100} LORA_R=${LORA_R:-16} LORA_STEPS=${LORA_STEPS:-1600}
HEX_TASKS=${HEX_TASKS:-color,shape,count,position,relation,grounding,caption,reasoning,multi_image,video}
MPO_N=${MPO_N:-600} MPO_SAMPLES=${MPO_SAMPLES:-8} MPO_STEPS=${MPO_STEPS:-300}
PRM_N=${PRM_N:-2000} PRM_STEPS=${PRM_STEPS:-1000} ORM_STEPS=${ORM_STEPS:-1000}
BON_N=${BON_N:-200} BON_K=${BON_K:-8} BENCH_N=${BENCH_N:-200}
TEST_N=$(printf '%s\n' "$EVAL_N" "$BON_N" "$BENCH_N" | sort -n | tail -1)  # one test split serves every step
export OMP_WAIT_POLICY=PASSIVE
mkdir -p "$OUT"
for v in MODEL EVAL_N HEX_N HEX_EVAL_N LORA_R LORA_STEPS MPO_N MPO_SAMPLES MPO_STEPS PRM_N PRM_STEPS ORM_STEPS \
         BON_N BON_K BENCH_N; do printf '%s\t%s\n' "$v" "${!v}"; done > "$OUT/sizes.tsv"

step() {  # step NAME DONE CMD...: run CMD unless the file DONE exists; its seconds go to OUT/times.tsv
  local name=$1 done=$2 t0
  shift 2
  if [ -e "$done" ]; then echo "== $name: done ($done)"; return; fi
  echo "== $name"
  t0=$(date +%s)
  "$@"
  printf '%s\t%s\n' "$name" "$(($(date +%s) - t0))" >> "$OUT/times.tsv"
}
wants() { [[ " $DEMOS " == *" $1 "* ]]; }
evaluate() {  # evaluate NAME MODEL FLAGS...: `eval synthetic` into OUT/eval/NAME, resuming its answers
  local name=$1 model=$2
  shift 2
  step "eval_$name" "$OUT/eval/$name/summary.json" \
    internvl eval synthetic "$model" --out "$OUT/eval/$name" --resume "$@"
}
test_eval=(--data-dir "$OUT/data/test" --limit "$EVAL_N")
hex_eval=(--data-dir "$OUT/data/hex-test" --tasks "$HEX_TASKS")

# the test split (every task), shared by the evals, best-of-N and prm-bench; the model before any training
step data_test "$OUT/data/test/meta.json" internvl synth --out "$OUT/data/test" --split test --n "$TEST_N"
evaluate base "$MODEL" "${test_eval[@]}"

# 1. hexagon LoRA: the demonstration split (scenes with the reserved hexagon), the ordinary LoRA fine-tuning
if wants lora; then
  step data_hexagon "$OUT/data/hexagon/meta.json" internvl synth --out "$OUT/data/hexagon" --split train \
    --n "$HEX_N" --hexagon
  step data_hex_test "$OUT/data/hex-test/meta.json" internvl synth --out "$OUT/data/hex-test" --split test \
    --n "$HEX_EVAL_N" --tasks "$HEX_TASKS" --hexagon
  evaluate base_hex "$MODEL" "${hex_eval[@]}"
  step lora "$OUT/lora/final/adapter_config.json" internvl finetune "$MODEL" --data "$OUT/data/hexagon/meta.json" \
    --lora-r "$LORA_R" --config "$HERE/configs/finetune/nano-lora-cpu.yaml" --max-steps "$LORA_STEPS" \
    --out "$OUT/lora" --resume
  evaluate lora_hex "$OUT/lora/final" "${hex_eval[@]}"
  evaluate lora "$OUT/lora/final" "${test_eval[@]}"
fi

# 2. MPO: pairs from the model's own answers to train-split reasoning questions (seed 1: not the items it trained
#    on), correct vs wrong and a correct answer's truncated continuation without the image; then MPO
if wants mpo; then
  step data_mpo "$OUT/data/mpo/meta.json" internvl synth --out "$OUT/data/mpo" --split train --n "$MPO_N" \
    --tasks reasoning --seed 1
  step prefs "$OUT/prefs/summary.json" internvl build-prefs "$MODEL" --data "$OUT/data/mpo/meta.json" \
    --out "$OUT/prefs" --task reasoning --n "$MPO_SAMPLES" --truncations-per-question 1 --seed 0 --resume
  step mpo "$OUT/mpo/final/config.json" internvl mpo "$MODEL" --data "$OUT/prefs/meta.json" \
    --config "$HERE/configs/mpo/nano.yaml" --max-steps "$MPO_STEPS" --out "$OUT/mpo" --resume
  evaluate mpo "$OUT/mpo/final" "${test_eval[@]}"
fi

# 3. a process reward model on step labels the synthetic world knows (no system prompt: the built-in model's
#    template has none), an outcome-only one on the same items, best-of-N and step F1 on the test split
if wants prm; then
  step data_prm "$OUT/data/prm-train/meta.json" internvl synth --out "$OUT/data/prm-train" --split train \
    --n "$PRM_N" --tasks reasoning,count
  step prm_data "$OUT/prm-data/meta.json" internvl prm-data "$OUT/data/prm-train" --out "$OUT/prm-data" \
    --system-message ""
  step prm "$OUT/prm/final/adapter_config.json" internvl finetune "$MODEL" --data "$OUT/prm-data/meta.json" \
    --config "$HERE/configs/finetune/nano-lora-cpu.yaml" --max-steps "$PRM_STEPS" --out "$OUT/prm" --resume
  orm=()
  if [ "$ORM_STEPS" -gt 0 ]; then
    step orm_data "$OUT/orm-data/meta.json" internvl prm-data "$OUT/data/prm-train" --out "$OUT/orm-data" \
      --system-message "" --orm
    step orm "$OUT/orm/final/adapter_config.json" internvl finetune "$MODEL" --data "$OUT/orm-data/meta.json" \
      --config "$HERE/configs/finetune/nano-lora-cpu.yaml" --max-steps "$ORM_STEPS" --out "$OUT/orm" --resume
    orm=(--orm "$OUT/orm/final")
  fi
  step bon "$OUT/bon.json" internvl bon "$MODEL" --prm "$OUT/prm/final" --prm-system "" ${orm[@]+"${orm[@]}"} \
    --data "$OUT/data/test" --task reasoning,count --n "$BON_K" --n-items "$BON_N" --out "$OUT/bon.json"
  step prm_test "$OUT/prm-test/meta.json" internvl prm-data "$OUT/data/test" --out "$OUT/prm-test" \
    --system-message "" --limit "$BENCH_N"
  step prm_bench "$OUT/prm_bench.json" internvl prm-bench "$OUT/prm/final" --prm-system "" \
    --data "$OUT/prm-test/meta.json" --out "$OUT/prm_bench.json"
fi

# 4. the README's tables from what the steps wrote
python "$HERE/runs/demo_tables.py" "$OUT" | tee "$OUT/tables.md"
