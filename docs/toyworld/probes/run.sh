#!/bin/bash
# One quick-start probe (docs/toyworld.md, "More settings, scored on more samples"): train PaRa on toy-sd1 with a
# held-out concept's five photos, then score the adapter with score.py. From the repository root:
#   para-trainer toyworld concept robot output/probes/robot --class-images 5     # photos + prior images
#   docs/toyworld/probes/run.sh NAME CONCEPT TRAIN_DIR PRESET RANK LR STEPS REG_DIR|none [PRIOR_WEIGHT] [base]
#   e.g. docs/toyworld/probes/run.sh sb_full_pw025 smiley-ball para_trainer/example_data/train full 2 1e-2 500 \
#            para_trainer/example_data/reg 0.25
# EXTRA='"lora_dim=4", "lora_alpha=1"' adds network_args. Runs one at a time: two at once on 2 cores crawl.
set -e
NAME=$1; CONCEPT=$2; TRAIN=$3; PRESET=$4; RANK=$5; LR=$6; STEPS=$7; REG=$8; WEIGHT=$9; BASE=${10}
OUT=output/probes/$NAME; mkdir -p "$OUT"
{
  printf '[model]\npretrained_model_name_or_path = "builtin:toy-sd1"\n[dataset]\ntrain_data_dir = "%s"\n' "$TRAIN"
  [ "$REG" != none ] && printf 'reg_data_dir = "%s"\n' "$REG"
  printf 'caption_extension = ".txt"\nresolution = "64"\n[network]\nnetwork_module = "networks.para"\n'
  printf 'network_dim = %s\nnetwork_args = ["preset=%s"%s]\n[training]\n' "$RANK" "$PRESET" "${EXTRA:+, $EXTRA}"
  printf 'output_dir = "%s"\noutput_name = "a"\nmax_train_steps = %s\ntrain_batch_size = 2\n' "$OUT" "$STEPS"
  printf 'learning_rate = %s\noptimizer_type = "AdamW"\nlr_scheduler = "constant"\nmixed_precision = "no"\n' "$LR"
  printf 'seed = 42\nsave_model_as = "safetensors"\nmax_data_loader_n_workers = 0\n'
  [ -n "$WEIGHT" ] && printf 'prior_loss_weight = %s\n' "$WEIGHT"
} > "$OUT/config.toml"
.venv/bin/python train_para.py --config_file "$OUT/config.toml" > "$OUT/train.log" 2>&1
.venv/bin/python docs/toyworld/probes/score.py "$OUT/a.safetensors" "$CONCEPT" $BASE | sed "s/^/$NAME /"
