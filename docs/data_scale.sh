#!/usr/bin/env bash
# MAE-Lite's (IJCV 2025) data-scale observation on CIFAR-10, the whole study in one script:
# an MAE ViT-Small teacher, then four ViT-Tiny students (from scratch, MAE, D-MAE, D²-MAE),
# each fine-tuned on 50, 200 and 1,000 labelled images per class with seeds 0, 1 and 2,
# the same number of optimizer steps (about 156 of 64 images) at every size, top-1 on the
# full 10,000-image val split. Results: docs/results.md.
#
#   bash docs/data_scale.sh                      # DATA=data/cifar10-jpg RUNS=runs/scale
#   python analyze.py --data_scale runs/scale/ft --output_dir runs/scale    # table + figure
#
# Resumable: a run whose log.txt holds its last epoch is skipped, and an interrupted run
# continues from its checkpoint.pth (the stages resume from --output_dir by themselves), so
# rerunning the script after an interrupt finishes the study. Each run's wall time is
# appended to $RUNS/times.tsv. bf16 needs a CPU with native bf16 (AMX / AVX512-BF16) or a
# GPU; on an AVX2-only CPU set PREC=fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/cifar10-jpg}
RUNS=${RUNS:-runs/scale}
PREC=${PREC:-bf16}
C="--input_size 32 --patch_size 4 --num_workers 1 --precision $PREC --data_path $DATA"
PT="$C --batch_size 128 --epochs 1 --warmup_epochs 0.2 --blr 1.5e-3"  # the students' pre-training
FS="$C --batch_size 64 --blr 2e-3 --aa none --mixup 0 --cutmix 0 --reprob 0 --drop_path 0 --min_crop_scale 0.35"
mkdir -p "$RUNS"

run() {  # run OUTPUT_DIR EPOCHS COMMAND...: skip a finished run, time the others
  local out=$1 epochs=$2; shift 2
  if [ -f "$out/log.txt" ] && tail -n 1 "$out/log.txt" | grep -q "\"epoch\": $((epochs - 1))}"; then
    echo "done already: $out"; return; fi
  echo "$(date +%T) start: $out"
  local t0=$SECONDS
  "$@" --output_dir "$out" > "$out.out" 2>&1 || { echo "failed: $out (see $out.out)"; exit 1; }
  printf '%s\t%d\n' "$out" $((SECONDS - t0)) >> "$RUNS/times.tsv"
  echo "$(date +%T) done in $((SECONDS - t0)) s: $out"
}

# Pre-training: the teacher (2 epochs), then one pre-training of each student (1 epoch).
run "$RUNS/teacher" 2 python mae_pretrain.py --model mae_vit_small --decoder_embed_dim 128 \
    --decoder_depth 2 --decoder_num_heads 4 $C --batch_size 128 --epochs 2 --warmup_epochs 0.4 --blr 1.5e-3
T="$RUNS/teacher/checkpoint.pth"
run "$RUNS/mae" 1 python mae_pretrain.py --model mae_vit_tiny $PT
run "$RUNS/dmae" 1 python distill_pretrain.py --method attn --model vit_tiny --teacher "$T" $PT
run "$RUNS/d2mae" 1 python distill_pretrain.py --method d2 --model vit_tiny --teacher "$T" $PT

# Fine-tuning: per class 50, 200, 1000 images = 7, 31, 156 steps of 64 per epoch, so
# 22, 5 and 1 epochs give 154, 155 and 156 steps; warm-up about 15% of them; one
# evaluation, after the last epoch. Seed 0 of every size and student first.
mkdir -p "$RUNS/ft"
for seed in 0 1 2; do
  for size in "50 22 3.3" "200 5 0.75" "1000 1 0.15"; do
    set -- $size  # images per class, epochs, warm-up epochs
    N="--train_subset $1 --epochs $2 --eval_freq $2 --warmup_epochs $3 --seed $seed"
    run "$RUNS/ft/scratch_$1_s$seed" "$2" python finetune.py --model vit_tiny $FS $N --layer_decay 1.0
    for s in mae dmae d2mae; do
      run "$RUNS/ft/${s}_$1_s$seed" "$2" python finetune.py --model vit_tiny \
          --finetune "$RUNS/$s/checkpoint.pth" $FS $N --layer_decay 0.75
    done
  done
done
echo "$(date +%T) study complete: python analyze.py --data_scale $RUNS/ft --output_dir $RUNS"
