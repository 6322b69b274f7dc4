#!/usr/bin/env bash
# The preconditioner probe of docs/preconditioners.md: tiny GPT-2 (2x64) pre-training on the built-in
# corpus, 300 steps of 16 x 64 tokens, cosine schedule, warm-up 20, clip 1.0, one seed; prints the
# held-out loss of every setting. Usage: bash scripts/probe_preconditioners.sh [OUT_DIR]
set -euo pipefail
out=${1:-outputs/probe-preconditioners}
common=(--task pretrain --max_steps 300 --block_size 64 --num_train_examples 3000 --per_device_train_batch_size 16
        --lr_scheduler_type cosine --warmup_steps 20 --eval_strategy steps --eval_steps 50 --disable_tqdm true
        --max_grad_norm 1.0)
run() {
  local name=$1; shift
  hf-badm train "${common[@]}" --output_dir "$out/$name" "$@" > "$out/$name.log" 2>&1
  python - "$out/$name/metrics.json" "$name" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
curve = [(h["step"], round(h["eval_loss"], 3)) for h in m["log_history"] if "eval_loss" in h]
print(f"{sys.argv[2]:<28} eval {m['eval_loss']:.4f}  {curve}")
PY
}
mkdir -p "$out"
run adamw-lr3e-3 --optimizer adamw_torch --learning_rate 0.003
run adamw-lr1e-2 --optimizer adamw_torch --learning_rate 0.01
run adamw-lr3e-2 --optimizer adamw_torch --learning_rate 0.03
run none-lr3-rho3 --learning_rate 3.0 --rho 3.0
run second_moment-s1-r1000 --preconditioner second_moment --learning_rate 1.0 --rho 1000
run second_moment-s1-r100 --preconditioner second_moment --learning_rate 1.0 --rho 100
run second_moment-s0.1-r600 --preconditioner second_moment --learning_rate 10 --rho 600
run second_moment-s0.03-r600 --preconditioner second_moment --learning_rate 33.3333 --rho 600
run ns-s30-r30-e1-1000 --preconditioner newton_schulz --elementwise_preconditioner second_moment --learning_rate 0.0333333 --rho 30 --elementwise_sigma 1 --elementwise_rho 1000
run ns-s10-r10-e1-1000 --preconditioner newton_schulz --elementwise_preconditioner second_moment --learning_rate 0.1 --rho 10 --elementwise_sigma 1 --elementwise_rho 1000
run ns-s100-r100-e1-1000 --preconditioner newton_schulz --elementwise_preconditioner second_moment --learning_rate 0.01 --rho 100 --elementwise_sigma 1 --elementwise_rho 1000
run ns-s30-r30-e0.1-600 --preconditioner newton_schulz --elementwise_preconditioner second_moment --learning_rate 0.0333333 --rho 30 --elementwise_sigma 0.1 --elementwise_rho 600
run ns-s10-r10-e0.1-600 --preconditioner newton_schulz --elementwise_preconditioner second_moment --learning_rate 0.1 --rho 10 --elementwise_sigma 0.1 --elementwise_rho 600
run ns-s30-r30-e0.03-300 --preconditioner newton_schulz --elementwise_preconditioner second_moment --learning_rate 0.0333333 --rho 30 --elementwise_sigma 0.03 --elementwise_rho 300
