#!/usr/bin/env bash
# The whole Lumina-mGPT-nano build after the VQGAN (stage 0), as in recipes/nano/README.md.
# RUNS=runs/nano by default; VQGAN=$RUNS/vqgan_refined (stage 0b's output); set T2I/SEG/DESC to change the data sizes.
set -euo pipefail
RUNS=${RUNS:-runs/nano}
VQGAN=${VQGAN:-$RUNS/vqgan_refined}
T2I=${T2I:-4000}; SEG=${SEG:-1500}; DESC=${DESC:-1500}
EXTRA=${EXTRA:-}   # extra `lumina-hf train` overrides, e.g. "--max_steps 5" for a smoke run
[ -d "$RUNS/init" ] || python -m examples.nano.build init --vqgan "$VQGAN" --out "$RUNS/init" --target-size 64
[ -d "$RUNS/raw64" ] || python -m examples.nano.build data --target-size 64 --t2i "$T2I" --out "$RUNS/raw64"
[ -d "$RUNS/raw96" ] || python -m examples.nano.build data --target-size 96 --t2i "$T2I" --segmentation "$SEG" --describe "$DESC" --out "$RUNS/raw96" --seed 1
M="--model $RUNS/init/model --processor $RUNS/init/processor --no-progress"
lumina-hf tokenize "$RUNS/raw64/t2i" -o "$RUNS/tok64/t2i" $M --target-size 64 --max-length 160
lumina-hf tokenize "$RUNS/raw96/t2i" -o "$RUNS/tok96/t2i" $M --target-size 96 --max-length 200 --uncond-ratio 0.1
lumina-hf tokenize "$RUNS/raw96/omni.json" -o "$RUNS/tok96/omni" $M --target-size 96 --max-length 200
lumina-hf train --config recipes/nano/fp_sft/config_64.yaml --model_name_or_path "$RUNS/init" \
  --dataset_mixture "[{path: $RUNS/tok64/t2i}]" --output_dir "$RUNS/fp_sft_64" $EXTRA
lumina-hf train --config recipes/nano/fp_sft/config_96.yaml --model_name_or_path "$RUNS/fp_sft_64" \
  --dataset_mixture "[{path: $RUNS/tok96/t2i}]" --output_dir "$RUNS/fp_sft_96" $EXTRA
lumina-hf train --config recipes/nano/fp_sft/config_96.yaml --model_name_or_path "$RUNS/fp_sft_96" \
  --dataset_mixture "[{path: $RUNS/tok96/t2i}]" --output_dir "$RUNS/fp_sft_96b" --num_train_epochs 10 --learning_rate 7e-4 $EXTRA
lumina-hf train --config recipes/nano/omni_sft/config.yaml --model_name_or_path "$RUNS/fp_sft_96b" \
  --dataset_mixture "[{path: $RUNS/tok96/t2i, weight: 1.0}, {path: $RUNS/tok96/omni}]" --output_dir "$RUNS/omni" $EXTRA
[ -d "$RUNS/raw96_more" ] || python -m examples.nano.build data --target-size 96 --t2i $((2 * T2I)) --segmentation $((2 * SEG)) --describe $((2 * DESC)) --out "$RUNS/raw96_more" --seed 2
lumina-hf tokenize "$RUNS/raw96_more/t2i" -o "$RUNS/tok96_more/t2i" $M --target-size 96 --max-length 200 --uncond-ratio 0.1
lumina-hf tokenize "$RUNS/raw96_more/omni.json" -o "$RUNS/tok96_more/omni" $M --target-size 96 --max-length 200
lumina-hf train --config recipes/nano/omni_sft/config.yaml --model_name_or_path "$RUNS/omni" --num_train_epochs 3 \
  --dataset_mixture "[{path: $RUNS/tok96/t2i}, {path: $RUNS/tok96/omni}, {path: $RUNS/tok96_more/t2i}, {path: $RUNS/tok96_more/omni}]" \
  --output_dir "$RUNS/omni_c" $EXTRA
# a fresh draw at 96 px (16000/4000/4000 with the default sizes), tokenized: fresh_draw SEED [SEGMENTATION_ITEMS]
# -> $RUNS/tok96_SEED
fresh_draw() {
  [ -d "$RUNS/raw96_$1" ] || python -m examples.nano.build data --target-size 96 --t2i $((4 * T2I)) \
    --segmentation "${2:-$((8 * SEG / 3))}" --describe $((8 * DESC / 3)) --out "$RUNS/raw96_$1" --seed "$1"
  lumina-hf tokenize "$RUNS/raw96_$1/t2i" -o "$RUNS/tok96_$1/t2i" $M --target-size 96 --max-length 200 --uncond-ratio 0.1
  lumina-hf tokenize "$RUNS/raw96_$1/omni.json" -o "$RUNS/tok96_$1/omni" $M --target-size 96 --max-length 200
}
# the text-to-image + Omni mixture of two tokenized draws: mixture A B
mixture() {
  echo "[{path: $RUNS/tok96_$1/t2i}, {path: $RUNS/tok96_$1/omni}, {path: $RUNS/tok96_$2/t2i}, {path: $RUNS/tok96_$2/omni}]"
}
# steps 6-7: deepen to 8 blocks (new blocks start as identities) and train on a third fresh draw + the second one
[ -d "$RUNS/grown8" ] || python -m examples.nano.build grow --model "$RUNS/omni_c" --out "$RUNS/grown8" --layers 8
fresh_draw 3
lumina-hf train --config recipes/nano/omni_sft/config_deep.yaml --model_name_or_path "$RUNS/grown8" \
  --dataset_mixture "$(mixture 3 more)" --output_dir "$RUNS/omni_deep" $EXTRA
# step 8: a fourth fresh draw, 2 more epochs over draws 4 and 3 at a lower rate
fresh_draw 4
lumina-hf train --config recipes/nano/omni_sft/config_deep.yaml --model_name_or_path "$RUNS/omni_deep" --num_train_epochs 2 \
  --learning_rate 3e-4 --dataset_mixture "$(mixture 4 3)" --output_dir "$RUNS/omni_deep2" $EXTRA
# step 9: deepen to 12 blocks, a fifth fresh draw, 2 epochs over draws 5 and 4
[ -d "$RUNS/grown12" ] || python -m examples.nano.build grow --model "$RUNS/omni_deep2" --out "$RUNS/grown12" --layers 12
fresh_draw 5
lumina-hf train --config recipes/nano/omni_sft/config_deep.yaml --model_name_or_path "$RUNS/grown12" --num_train_epochs 2 \
  --learning_rate 4e-4 --dataset_mixture "$(mixture 5 4)" --output_dir "$RUNS/omni_deep3" $EXTRA
# step 10: a sixth fresh draw with three times the segmentation items (12000 with the default sizes),
# 2 epochs over it alone
fresh_draw 6 $((8 * SEG))
lumina-hf train --config recipes/nano/omni_sft/config_deep.yaml --model_name_or_path "$RUNS/omni_deep3" --num_train_epochs 2 \
  --learning_rate 3e-4 --dataset_mixture "[{path: $RUNS/tok96_6/t2i}, {path: $RUNS/tok96_6/omni}]" --output_dir "$RUNS/omni_seg" $EXTRA
# step 11: a seventh draw with more segmentation than text-to-image (12000 / 16000 / 4000), 2 epochs over it
[ -d "$RUNS/raw96_7" ] || python -m examples.nano.build data --target-size 96 --t2i $((3 * T2I)) --segmentation $((32 * SEG / 3)) \
  --describe $((8 * DESC / 3)) --out "$RUNS/raw96_7" --seed 7
lumina-hf tokenize "$RUNS/raw96_7/t2i" -o "$RUNS/tok96_7/t2i" $M --target-size 96 --max-length 200 --uncond-ratio 0.1
lumina-hf tokenize "$RUNS/raw96_7/omni.json" -o "$RUNS/tok96_7/omni" $M --target-size 96 --max-length 200
lumina-hf train --config recipes/nano/omni_sft/config_deep.yaml --model_name_or_path "$RUNS/omni_seg" --num_train_epochs 2 \
  --learning_rate 3e-4 --dataset_mixture "[{path: $RUNS/tok96_7/t2i}, {path: $RUNS/tok96_7/omni}]" --output_dir "$RUNS/omni_seg2" $EXTRA
# step 12: an eighth draw, text-to-image only (12000), one epoch over it and draw 7's Omni items at half the rate
[ -d "$RUNS/raw96_8" ] || python -m examples.nano.build data --target-size 96 --t2i $((3 * T2I)) --out "$RUNS/raw96_8" --seed 8
lumina-hf tokenize "$RUNS/raw96_8/t2i" -o "$RUNS/tok96_8/t2i" $M --target-size 96 --max-length 200 --uncond-ratio 0.1
lumina-hf train --config recipes/nano/omni_sft/config_deep.yaml --model_name_or_path "$RUNS/omni_seg2" --num_train_epochs 1 \
  --learning_rate 1.5e-4 --dataset_mixture "[{path: $RUNS/tok96_8/t2i}, {path: $RUNS/tok96_7/omni}]" --output_dir "$RUNS/omni_seg3" $EXTRA
# step 14: a ninth draw, text-to-image only (16000), one epoch over draws 9 and 8 and draw 7's Omni items
[ -d "$RUNS/raw96_9" ] || python -m examples.nano.build data --target-size 96 --t2i $((4 * T2I)) --out "$RUNS/raw96_9" --seed 9
lumina-hf tokenize "$RUNS/raw96_9/t2i" -o "$RUNS/tok96_9/t2i" $M --target-size 96 --max-length 200 --uncond-ratio 0.1
lumina-hf train --config recipes/nano/omni_sft/config_deep.yaml --model_name_or_path "$RUNS/omni_seg3" --num_train_epochs 1 \
  --learning_rate 1.5e-4 --dataset_mixture "[{path: $RUNS/tok96_9/t2i}, {path: $RUNS/tok96_8/t2i}, {path: $RUNS/tok96_7/omni}]" \
  --output_dir "$RUNS/omni_seg4" $EXTRA
# step 15: deepen to 16 blocks, one epoch over draws 9 and 6 (text-to-image) and draw 7's Omni items
[ -d "$RUNS/grown16" ] || python -m examples.nano.build grow --model "$RUNS/omni_seg4" --out "$RUNS/grown16" --layers 16
lumina-hf train --config recipes/nano/omni_sft/config_deep.yaml --model_name_or_path "$RUNS/grown16" --num_train_epochs 1 \
  --learning_rate 3e-4 --dataset_mixture "[{path: $RUNS/tok96_9/t2i}, {path: $RUNS/tok96_6/t2i}, {path: $RUNS/tok96_7/omni}]" \
  --output_dir "$RUNS/omni_g16" $EXTRA
# step 16: one epoch at a lower rate over draws 8 and 5 (text-to-image) and draw 6's Omni items
lumina-hf train --config recipes/nano/omni_sft/config_deep.yaml --model_name_or_path "$RUNS/omni_g16" --num_train_epochs 1 \
  --learning_rate 1e-4 --dataset_mixture "[{path: $RUNS/tok96_8/t2i}, {path: $RUNS/tok96_5/t2i}, {path: $RUNS/tok96_6/omni}]" \
  --output_dir "$RUNS/omni_g16b" $EXTRA
# step 17: one epoch at a still lower rate over draws 9 and 7 (text-to-image) and draw 5's Omni items
lumina-hf train --config recipes/nano/omni_sft/config_deep.yaml --model_name_or_path "$RUNS/omni_g16b" --num_train_epochs 1 \
  --learning_rate 7e-5 --dataset_mixture "[{path: $RUNS/tok96_9/t2i}, {path: $RUNS/tok96_7/t2i}, {path: $RUNS/tok96_5/omni}]" \
  --output_dir "$RUNS/omni_g16c" $EXTRA
# step 18: the shipped form
python -m examples.nano.build export --model "$RUNS/omni_g16c" --out "$RUNS/export" --target-size 96 --dtype bfloat16 \
  --vq-decoder-dtype bfloat16 --guidance-scale 1.0 --image-top-k 2 --temperature 0.3 --omni-image-top-k 1 --num-candidates 8
