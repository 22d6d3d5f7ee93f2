#!/usr/bin/env bash
# The exact commands behind the README's benchmark figures. Run on an IDLE machine, one at a time:
# two processes that each use the cores slow each other down by large factors.
#
#   bash benchmarks/run.sh            # main table + speed-up-vs-N sweep into benchmarks/results/
#   bash benchmarks/run.sh main       # only the main table
#   bash benchmarks/run.sh sweep      # only the sweep
#   bash benchmarks/run.sh smoke      # a 1-problem, 32-token check of the whole pipeline (into /tmp)
#   bash benchmarks/run.sh llamacpp   # our methods on the llama.cpp backend beside llama.cpp itself
#   bash benchmarks/run.sh llamacpp-bf16  # the same on a BF16 re-encoding of the default GGUF (stand convert --to bf16)
#   bash benchmarks/run.sh torch      # our methods on the torch backend (dtype auto), n=1 and 8
#   bash benchmarks/run.sh int4       # the int4 lean forward (the GGUF's own Q4 blocks) beside bfloat16 and llama.cpp
#   bash benchmarks/run.sh arithmetic # stand solve on generated arithmetic: single-sample vs vote accuracy, none vs stand
#   bash benchmarks/run.sh vllm       # stand's proposers inside vLLM beside vLLM's own; our stand against our suffix
#
# Knobs (environment): DTYPE (auto = bfloat16 where the CPU has native bf16), REPEATS, PROBLEMS, TOKENS.
# A Ctrl-C still prints and writes the rows of the problems that every method finished.
set -euo pipefail
cd "$(dirname "$0")/.."

WHAT=${1:-all}
DTYPE=${DTYPE:-auto}
REPEATS=${REPEATS:-1}
OUT=benchmarks/results
MAIN_METHODS=none,pld,recycle,stand,consensus,ngrammys,stand+consensus,hf,hf-pld,hf-batched
SWEEP_METHODS=none,pld,recycle,stand,consensus,stand+consensus,hf,hf-batched

machine() {  # what the numbers were measured on, beside them
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' (+ uncommitted changes in src)')"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "cores: $(nproc)  memory: $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    python3 -c 'import sys, torch, transformers; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")'
  } > "$1"
}

run_main() {  # the README's main table: CHAMP, 10 problems, 512 new tokens, T=0.6, n = 1 and 8
  machine "$OUT/main.machine.txt"
  stand bench --methods "$MAIN_METHODS" --dataset champ --problems "${PROBLEMS:-10}" --n 1,8 \
    --temperature 0.6 --max-new-tokens "${TOKENS:-512}" --seed 0 --repeats "$REPEATS" --dtype "$DTYPE" \
    --json "$OUT/main.json" --plot "$OUT/main" | tee -i "$OUT/main.txt"
  python3 -m stand.lab.report "$OUT/main.json" > "$OUT/main.md"
}

run_sweep() {  # speed-up against N: fewer problems and tokens, since n=16 costs 16 samples per problem
  machine "$OUT/sweep.machine.txt"
  stand bench --methods "$SWEEP_METHODS" --dataset champ --problems "${PROBLEMS:-4}" --n 1,2,4,8,16 \
    --temperature 0.6 --max-new-tokens "${TOKENS:-256}" --seed 0 --repeats "$REPEATS" --dtype "$DTYPE" \
    --json "$OUT/sweep.json" --plot "$OUT/sweep" | tee -i "$OUT/sweep.txt"
  python3 -m stand.lab.report "$OUT/sweep.json" > "$OUT/sweep.md"
}

run_llamacpp() {  # issue 13: our methods on the llama.cpp backend beside llama.cpp's own loop (held-out CHAMP)
  machine "$OUT/llamacpp.machine.txt"
  local first=${FIRST:-240} problems=${PROBLEMS:-5} tokens=${TOKENS:-256}
  for t in 0.6 0; do
    stand bench --backend llama.cpp --methods none,pld,recycle,stand,stand-dynamic,suffix,llama.cpp,llama.cpp-pld \
      --dataset champ --first "$first" --problems "$problems" --n 1 --temperature "$t" --max-new-tokens "$tokens" \
      --seed 0 --repeats "$REPEATS" --json "$OUT/llamacpp_n1_t$t.json" | tee -i "$OUT/llamacpp_n1_t$t.txt"
  done
  stand bench --backend llama.cpp --methods none,pld,recycle,stand,consensus,stand+consensus,suffix --dataset champ \
    --first "$first" --problems "${PROBLEMS8:-3}" --n 8 --temperature 0.6 --max-new-tokens "$tokens" --seed 0 \
    --schedule batched,sequential,auto --json "$OUT/llamacpp_n8_t0.6.json" | tee -i "$OUT/llamacpp_n8_t0.6.txt"
  python3 benchmarks/greedy_agreement.py --first "$first" --problems "$problems" --max-new-tokens "$tokens" \
    | tee -i "$OUT/llamacpp_greedy_agreement.txt"
}

run_llamacpp_bf16() {  # the default model's weights as BF16 (llama.cpp's quantizer): multi-token passes are cheap
  machine "$OUT/llamacpp_bf16.machine.txt"
  local first=${FIRST:-240} problems=${PROBLEMS:-4} tokens=${TOKENS:-256}
  local gguf=${STAND_CACHE:-$HOME/.cache/stand}/models/SmolLM2-135M-Instruct.BF16.gguf
  if [ ! -f "$gguf" ]; then
    mkdir -p "$(dirname "$gguf")"
    stand convert "$(python3 -c 'from stand.backends.load import default_model_path; print(default_model_path())')" "$gguf" --to bf16
  fi
  stand profile --backend llama.cpp --model "$gguf" --grid "$OUT/llamacpp_bf16.grid.json" | tee -i "$OUT/llamacpp_bf16.profile.txt"
  stand bench --backend llama.cpp --model "$gguf" --methods none,pld,recycle,stand,stand-dynamic,suffix,llama.cpp \
    --dataset champ --first "$first" --problems "$problems" --n 1 --temperature 0.6 --max-new-tokens "$tokens" \
    --seed 0 --repeats "$REPEATS" --json "$OUT/llamacpp_bf16_n1_t0.6.json" | tee -i "$OUT/llamacpp_bf16_n1_t0.6.txt"
  stand bench --backend llama.cpp --model "$gguf" --methods none,pld,recycle,stand,consensus,suffix --dataset champ \
    --first "$first" --problems "${PROBLEMS8:-2}" --n 8 --temperature 0.6 --max-new-tokens "$tokens" --seed 0 \
    --schedule batched,auto --json "$OUT/llamacpp_bf16_n8_t0.6.json" | tee -i "$OUT/llamacpp_bf16_n8_t0.6.txt"
}

run_torch() {  # issue 17: our methods on the torch backend (dtype auto: measured), held-out CHAMP, n=1 and n=8
  machine "$OUT/torch.machine.txt"
  local first=${FIRST:-240} problems=${PROBLEMS:-4} tokens=${TOKENS:-256}
  stand bench --backend torch --dtype "$DTYPE" --methods none,pld,recycle,stand,stand-dynamic,consensus,ngrammys,suffix,hf \
    --dataset champ --first "$first" --problems "$problems" --n 1 --temperature 0.6 --max-new-tokens "$tokens" \
    --seed 0 --repeats "$REPEATS" --json "$OUT/torch_n1_t0.6.json" | tee -i "$OUT/torch_n1_t0.6.txt"
  stand bench --backend torch --dtype "$DTYPE" --methods none,pld,recycle,stand,consensus,suffix --dataset champ \
    --first "$first" --problems "${PROBLEMS8:-2}" --n 8 --temperature 0.6 --max-new-tokens "$tokens" --seed 0 \
    --schedule batched,sequential,auto --json "$OUT/torch_n8_t0.6.json" | tee -i "$OUT/torch_n8_t0.6.txt"
}

run_int4() {  # issue 22: int4 and bfloat16 on torch, the llama.cpp anchor in each run; held-out CHAMP 241+
  machine "$OUT/int4.machine.txt"
  local first=${FIRST:-240} problems=${PROBLEMS:-4} tokens=${TOKENS:-256} ours=none,pld,recycle,stand,stand-dynamic,suffix
  for t in 0.6 0; do
    for d in int4 bfloat16; do
      stand bench --backend torch --dtype "$d" --methods "$ours,llama.cpp" --dataset champ --first "$first" \
        --problems "$problems" --n 1 --temperature "$t" --max-new-tokens "$tokens" --seed 0 --repeats "$REPEATS" \
        --json "$OUT/int4_${d}_n1_t$t.json" | tee -i "$OUT/int4_${d}_n1_t$t.txt"
    done
  done
  for d in int4 bfloat16; do  # n=8: plain batched (none) and the drafters, batched and k-at-a-time
    stand bench --backend torch --dtype "$d" --methods none,pld,recycle,stand,consensus,stand+consensus,suffix \
      --dataset champ --first "$first" --problems "${PROBLEMS8:-2}" --n 8 --temperature 0.6 --max-new-tokens "$tokens" \
      --seed 0 --schedule batched,auto --json "$OUT/int4_${d}_n8_t0.6.json" | tee -i "$OUT/int4_${d}_n8_t0.6.txt"
  done
  stand bench --backend llama.cpp --methods none,llama.cpp --dataset champ --first "$first" --problems "${PROBLEMS8:-2}" \
    --n 8 --temperature 0.6 --max-new-tokens "$tokens" --seed 0 --schedule batched \
    --json "$OUT/int4_llamacpp_n8_t0.6.json" | tee -i "$OUT/int4_llamacpp_n8_t0.6.txt"
  stand profile --backend torch --dtype int4 | tee -i "$OUT/int4_profile.txt"
  python3 benchmarks/greedy_agreement.py --backend torch --dtype int4 --first "$first" --problems "$problems" \
    --max-new-tokens "$tokens" | tee -i "$OUT/int4_greedy_agreement.txt"
  python3 benchmarks/rss.py --tokens "$tokens" | tee -i "$OUT/int4_rss.txt"
}

run_arithmetic() {  # issue 17: self-consistency pays on a set the default model can solve; lossless: none = stand
  machine "$OUT/arithmetic.machine.txt"
  for m in none stand; do
    stand solve --dataset arithmetic:1 --problems "${PROBLEMS:-40}" --n 8 --method "$m" --temperature 0.6 \
      --max-new-tokens 96 --seed 0 --json "$OUT/arithmetic_$m.json" | tail -n 3 | tee -i "$OUT/arithmetic_$m.txt"
  done
}

run_vllm() {  # issue 14 (needs scripts/setup-vllm.sh): held-out CHAMP, T=0.6 and greedy, n=1 and 8, one run each
  machine "$OUT/vllm.machine.txt"
  "$(python3 -c 'from stand.integrations.vllm.launch import vllm_python; print(vllm_python())')" -c \
    'import vllm; print("vllm", vllm.__version__, "k", __import__("os").environ.get("STAND_VLLM_K", 5))' >> "$OUT/vllm.machine.txt"
  local first=${FIRST:-240} problems=${PROBLEMS:-4} tokens=${TOKENS:-256} backend=${BACKEND:-torch}
  for t in 0.6 0; do
    stand bench --backend "$backend" --dtype "$DTYPE" --dataset champ --first "$first" --problems "$problems" \
      --methods none,stand,suffix,consensus,vllm,vllm-ngram,vllm-suffix,vllm-stand,vllm-consensus --n 1,8 \
      --temperature "$t" --max-new-tokens "$tokens" --seed 0 --repeats "$REPEATS" --json "$OUT/vllm_t$t.json" \
      | tee -i "$OUT/vllm_t$t.txt"
    python3 -m stand.lab.report "$OUT/vllm_t$t.json" > "$OUT/vllm_t$t.md"
  done
}

run_smoke() {
  OUT=$(mktemp -d /tmp/stand-bench-smoke.XXXX)
  stand bench --methods "$MAIN_METHODS" --dataset champ --problems 1 --n 1,2 --temperature 0.6 \
    --max-new-tokens 32 --dtype "$DTYPE" --json "$OUT/smoke.json" --plot "$OUT/plots"
  python3 -m stand.lab.report "$OUT/smoke.json"
  echo "smoke results in $OUT"
}

mkdir -p "$OUT"
case "$WHAT" in
  all) run_main; run_sweep ;;
  main) run_main ;;
  sweep) run_sweep ;;
  smoke) run_smoke ;;
  llamacpp) run_llamacpp ;;
  llamacpp-bf16) run_llamacpp_bf16 ;;
  vllm) run_vllm ;;
  torch) run_torch ;;
  int4) run_int4 ;;
  arithmetic) run_arithmetic ;;
  *) echo "usage: $0 [all|main|sweep|smoke|llamacpp|llamacpp-bf16|vllm|torch|int4|arithmetic]" >&2; exit 2 ;;
esac
