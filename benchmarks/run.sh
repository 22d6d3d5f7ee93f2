#!/usr/bin/env bash
# The commands behind the figures in docs/results.md, one named run each:
#
#   bash benchmarks/run.sh NAME     # writes benchmarks/results/NAME/: machine.txt, then the run's JSON, tables, plots
#   bash benchmarks/run.sh          # lists the names
#
# Run on an IDLE machine, one run at a time: two processes that each use the cores slow each other down by large
# factors, and nothing inside one process can correct for that.
#
# Knobs (environment): RUN (the results folder's name, default NAME: give another to keep an earlier run's files),
# DTYPE (torch: auto = the faster of bfloat16 and float32 here, measured once), REPEATS, FIRST (index of the first
# CHAMP problem), PROBLEMS, PROBLEMS8 (problems at n=8), TOKENS (new tokens per sample), METHODS8 (int4-n8), TEMPS, BUDGETS and SPEED
# (acceptance: the temperatures, node budgets, and SPEED=0 for A alone), LEVELS, EQUAL, CHAMP, BACKEND (search), NS and BUDGET
# (sharing; NS also overlap and replay), METHOD and GRID (calibrate-replay). machine.txt records them.
# A Ctrl-C still writes the rows of the problems that every method finished.
#
# Adding a run: a function run_NAME (dashes in NAME become underscores) that writes its files into "$RESULTS".
set -euo pipefail
cd "$(dirname "$0")/.."

DTYPE=${DTYPE:-auto}
REPEATS=${REPEATS:-1}
MAIN_METHODS=none,pld,recycle,stand,consensus,ngrammys,stand+consensus,hf,hf-pld,hf-batched
SWEEP_METHODS=none,pld,recycle,stand,consensus,stand+consensus,hf,hf-batched

machine() {  # what the numbers were measured on, beside them
  echo "run: $1"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' (+ uncommitted changes in src)')"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "avx512_bf16: $(grep -q avx512_bf16 /proc/cpuinfo && echo yes || echo no)"
  echo "cores: $(nproc)  memory: $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "knobs: BACKEND=${BACKEND:-} DTYPE=$DTYPE REPEATS=$REPEATS FIRST=${FIRST:-} PROBLEMS=${PROBLEMS:-} PROBLEMS8=${PROBLEMS8:-} TOKENS=${TOKENS:-} TEMPS=${TEMPS:-} BUDGETS=${BUDGETS:-} NS=${NS:-} BUDGET=${BUDGET:-}"
  python3 -c 'import sys, torch, transformers; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")'
}

table() {  # a bench JSON as a markdown table beside it
  python3 -m stand.lab.report "$1.json" > "$1.md"
}

run_main() {  # CHAMP, 10 problems, 512 new tokens, T=0.6, n = 1 and 8, beside the Hugging Face anchors
  stand bench --methods "$MAIN_METHODS" --dataset champ --problems "${PROBLEMS:-10}" --n 1,8 \
    --temperature 0.6 --max-new-tokens "${TOKENS:-512}" --seed 0 --repeats "$REPEATS" --dtype "$DTYPE" \
    --json "$RESULTS/main.json" --plot "$RESULTS/main" | tee -i "$RESULTS/main.txt"
  table "$RESULTS/main"
}

run_sweep() {  # speed-up against N: fewer problems and tokens, since n=16 costs 16 samples per problem
  stand bench --methods "$SWEEP_METHODS" --dataset champ --problems "${PROBLEMS:-4}" --n 1,2,4,8,16 \
    --temperature 0.6 --max-new-tokens "${TOKENS:-256}" --seed 0 --repeats "$REPEATS" --dtype "$DTYPE" \
    --json "$RESULTS/sweep.json" --plot "$RESULTS/sweep" | tee -i "$RESULTS/sweep.txt"
  table "$RESULTS/sweep"
}

run_torch() {  # our methods on the torch backend beside Hugging Face generate, held-out CHAMP, n=1 and n=8
  local first=${FIRST:-240} problems=${PROBLEMS:-4} tokens=${TOKENS:-256}
  stand bench --backend torch --dtype "$DTYPE" --methods none,pld,recycle,stand,stand-dynamic,consensus,ngrammys,suffix,hf \
    --dataset champ --first "$first" --problems "$problems" --n 1 --temperature 0.6 --max-new-tokens "$tokens" \
    --seed 0 --repeats "$REPEATS" --json "$RESULTS/n1_t0.6.json" --plot "$RESULTS/n1_t0.6" | tee -i "$RESULTS/n1_t0.6.txt"
  stand bench --backend torch --dtype "$DTYPE" --methods none,pld,recycle,stand,consensus,suffix --dataset champ \
    --first "$first" --problems "${PROBLEMS8:-2}" --n 8 --temperature 0.6 --max-new-tokens "$tokens" --seed 0 \
    --schedule batched,sequential,auto --json "$RESULTS/n8_t0.6.json" --plot "$RESULTS/n8_t0.6" | tee -i "$RESULTS/n8_t0.6.txt"
}

run_llamacpp() {  # our methods on the llama.cpp backend (the shipped Q4_1 file) beside llama.cpp's own loop
  local first=${FIRST:-240} problems=${PROBLEMS:-4} tokens=${TOKENS:-256}
  for t in 0.6 0; do
    stand bench --backend llama.cpp --methods none,pld,recycle,stand,stand-dynamic,suffix,llama.cpp,llama.cpp-pld \
      --dataset champ --first "$first" --problems "$problems" --n 1 --temperature "$t" --max-new-tokens "$tokens" \
      --seed 0 --repeats "$REPEATS" --json "$RESULTS/n1_t$t.json" --plot "$RESULTS/n1_t$t" | tee -i "$RESULTS/n1_t$t.txt"
  done
  stand bench --backend llama.cpp --methods none,pld,recycle,stand,consensus,stand+consensus,suffix --dataset champ \
    --first "$first" --problems "${PROBLEMS8:-2}" --n 8 --temperature 0.6 --max-new-tokens "$tokens" --seed 0 \
    --schedule batched,sequential,auto --json "$RESULTS/n8_t0.6.json" --plot "$RESULTS/n8_t0.6" | tee -i "$RESULTS/n8_t0.6.txt"
  python3 benchmarks/greedy_agreement.py --first "$first" --problems "$problems" --max-new-tokens "$tokens" \
    | tee -i "$RESULTS/greedy_agreement.txt"
}

gguf_as() {  # the default GGUF re-encoded as $1 by llama.cpp's quantizer (made once, in stand's cache); prints its path
  local out=${STAND_CACHE:-$HOME/.cache/stand}/models/SmolLM2-135M-Instruct.${1^^}.gguf
  if [ ! -f "$out" ]; then
    mkdir -p "$(dirname "$out")"
    stand convert "$(python3 -c 'from stand.backends.load import default_model_path; print(default_model_path())')" "$out" --to "$1" >&2
  fi
  echo "$out"
}

run_llamacpp_bf16() {  # the default model's weights as BF16: on a CPU with avx512_bf16 multi-token passes are cheap
  local first=${FIRST:-240} problems=${PROBLEMS:-4} tokens=${TOKENS:-256} gguf
  gguf=$(gguf_as bf16)
  stand profile --backend llama.cpp --model "$gguf" --grid "$RESULTS/grid.json" | tee -i "$RESULTS/profile.txt"
  stand bench --backend llama.cpp --model "$gguf" --methods none,pld,recycle,stand,stand-dynamic,suffix,llama.cpp \
    --dataset champ --first "$first" --problems "$problems" --n 1 --temperature 0.6 --max-new-tokens "$tokens" \
    --seed 0 --repeats "$REPEATS" --json "$RESULTS/n1_t0.6.json" --plot "$RESULTS/n1_t0.6" | tee -i "$RESULTS/n1_t0.6.txt"
  stand bench --backend llama.cpp --model "$gguf" --methods none,pld,recycle,stand,consensus,suffix --dataset champ \
    --first "$first" --problems "${PROBLEMS8:-2}" --n 8 --temperature 0.6 --max-new-tokens "$tokens" --seed 0 \
    --schedule batched,auto --json "$RESULTS/n8_t0.6.json" --plot "$RESULTS/n8_t0.6" | tee -i "$RESULTS/n8_t0.6.txt"
}

run_llamacpp_weights() {  # what a llama.cpp pass costs by weight type: the cost grid of each re-encoding, one process each
  local model
  for w in q4_1 q8_0 f16 bf16 f32; do
    if [ "$w" = q4_1 ]; then
      model=$(python3 -c 'from stand.backends.load import default_model_path; print(default_model_path())')
    else
      model=$(gguf_as "$w")
    fi
    stand profile --backend llama.cpp --model "$model" --grid "$RESULTS/grid_$w.json" | tee -i "$RESULTS/profile_$w.txt"
  done
}

run_arithmetic() {  # stand solve on generated arithmetic (llama.cpp): single-sample against vote accuracy, none and stand
  for m in none stand; do
    stand solve --dataset arithmetic:1 --problems "${PROBLEMS:-40}" --n 8 --method "$m" --temperature 0.6 \
      --max-new-tokens 96 --seed 0 --json "$RESULTS/$m.json" | tail -n 3 | tee -i "$RESULTS/$m.txt"
  done
}

run_search() {  # beam search and DVTS beside self-consistency and best-of-N (BACKEND, default auto: the fastest here)
  # arithmetic levels LEVELS: accuracy, tokens per problem, tok/s and A of every strategy, none against stand, n=8,
  # width 4 (DVTS: 2 subtrees), T=0.6; then (EQUAL=1) A alone with equal budgets (7 nodes a row at every n: what
  # sharing one table buys, independent of load); then (CHAMP=1) held-out CHAMP end to end
  local problems=${PROBLEMS:-40} tokens=${TOKENS:-256} methods=${METHODS:-none,stand,consensus,suffix}
  local engine=(--backend "${BACKEND:-auto}" --dtype "$DTYPE")
  for level in ${LEVELS-1 2}; do  # LEVELS= (empty): none, e.g. for CHAMP alone
    stand search-bench "${engine[@]}" --dataset "arithmetic:$level" --problems "$problems" --n 8 --width 4 --methods "$methods" \
      --strategies single,self-consistency,best-of-n,beam,dvts --temperature 0.6 --max-new-tokens "$tokens" --seed 0 \
      --json "$RESULTS/arithmetic$level.json" | tee -i "$RESULTS/arithmetic$level.txt"
    [ "${EQUAL:-1}" = 1 ] || continue
    stand search-bench "${engine[@]}" --dataset "arithmetic:$level" --problems "$problems" --n 8 --width 4 --methods stand \
      --strategies single,self-consistency,beam,dvts --nodes 7 --temperature 0.6 --max-new-tokens "$tokens" --seed 0 \
      --json "$RESULTS/arithmetic${level}_nodes7.json" | tee -i "$RESULTS/arithmetic${level}_nodes7.txt"
  done
  [ "${CHAMP:-1}" = 1 ] || return 0
  stand search-bench "${engine[@]}" --dataset champ --first "${FIRST:-200}" --problems "${PROBLEMS_CHAMP:-4}" --n 8 --width 4 \
    --methods none,stand --strategies beam,dvts --temperature 0.6 --max-new-tokens "${TOKENS_CHAMP:-512}" --seed 0 \
    --json "$RESULTS/champ.json" | tee -i "$RESULTS/champ.txt"
}

run_vllm() {  # stand's proposers inside vLLM beside vLLM's own (needs scripts/setup-vllm.sh); held-out CHAMP
  "$(python3 -c 'from stand.integrations.vllm.launch import vllm_python; print(vllm_python())')" -c \
    'import vllm; print("vllm", vllm.__version__, "k", __import__("os").environ.get("STAND_VLLM_K", 5))' >> "$RESULTS/machine.txt"
  local first=${FIRST:-240} problems=${PROBLEMS:-4} tokens=${TOKENS:-256} backend=${BACKEND:-torch}
  for t in 0.6 0; do
    stand bench --backend "$backend" --dtype "$DTYPE" --dataset champ --first "$first" --problems "$problems" \
      --methods none,stand,suffix,consensus,vllm,vllm-ngram,vllm-suffix,vllm-stand,vllm-consensus --n 1,8 \
      --temperature "$t" --max-new-tokens "$tokens" --seed 0 --repeats "$REPEATS" --json "$RESULTS/t$t.json" \
      | tee -i "$RESULTS/t$t.txt"
    table "$RESULTS/t$t"
  done
}

run_int4() {  # the three int4 runs below, one after another, into one folder
  run_int4_n1; run_int4_n8; run_int4_pass
}

run_int4_n1() {  # int4 and bfloat16 on torch at n=1, the llama.cpp anchor beside the int4 rows; held-out CHAMP 241+
  local first=${FIRST:-240} problems=${PROBLEMS:-4} tokens=${TOKENS:-256} ours=none,pld,recycle,stand,stand-dynamic,suffix
  for t in 0.6 0; do
    for d in int4 bfloat16; do  # the llama.cpp anchor reads the GGUF file beside the int4 rows
      local anchor=""; [ "$d" = int4 ] && anchor=,llama.cpp
      stand bench --backend torch --dtype "$d" --methods "$ours$anchor" --dataset champ --first "$first" \
        --problems "$problems" --n 1 --temperature "$t" --max-new-tokens "$tokens" --seed 0 --repeats "$REPEATS" \
        --json "$RESULTS/${d}_n1_t$t.json" | tee -i "$RESULTS/${d}_n1_t$t.txt"
      table "$RESULTS/${d}_n1_t$t"
    done
  done
}

run_int4_n8() {  # n=8 at T=0.6: int4 and bfloat16 plain batched (none) and the drafters, batched and k at a time,
  # and llama.cpp's plain batched n=8 (our engine on llama.cpp: its own loop has no batch); held-out CHAMP 241+
  local first=${FIRST:-240} tokens=${TOKENS:-256}
  for d in int4 bfloat16; do
    stand bench --backend torch --dtype "$d" --methods "${METHODS8:-none,pld,recycle,stand,consensus,stand+consensus,suffix}" \
      --dataset champ --first "$first" --problems "${PROBLEMS8:-2}" --n 8 --temperature 0.6 --max-new-tokens "$tokens" \
      --seed 0 --schedule batched,auto --json "$RESULTS/${d}_n8_t0.6.json" | tee -i "$RESULTS/${d}_n8_t0.6.txt"
    table "$RESULTS/${d}_n8_t0.6"
  done
  stand bench --backend llama.cpp --methods none --dataset champ --first "$first" --problems "${PROBLEMS8:-2}" \
    --n 8 --temperature 0.6 --max-new-tokens "$tokens" --seed 0 --schedule batched \
    --json "$RESULTS/llamacpp_n8_t0.6.json" | tee -i "$RESULTS/llamacpp_n8_t0.6.txt"
  table "$RESULTS/llamacpp_n8_t0.6"
}

run_int4_pass() {  # the int4 pass op by op, greedy agreement with plain greedy, and peak memory per dtype
  local first=${FIRST:-240} problems=${PROBLEMS:-4} tokens=${TOKENS:-256}
  stand profile --backend torch --dtype int4 | tee -i "$RESULTS/profile.txt"
  python3 benchmarks/greedy_agreement.py --backend torch --dtype int4 --first "$first" --problems "$problems" \
    --max-new-tokens "$tokens" | tee -i "$RESULTS/greedy_agreement.txt"
  python3 benchmarks/rss.py --tokens "$tokens" | tee -i "$RESULTS/rss.txt"
}

run_int4_compile() {  # torch.compile of the int4 layers against eager: ms per pass and cold compile seconds
  python3 benchmarks/int4_compile.py --json "$RESULTS/passes.json" | tee -i "$RESULTS/passes.txt"
}

run_load_2000() {  # the server under concurrent clients with long prompts: tokens/s and peak memory, none and stand
  python3 benchmarks/load.py --methods none,stand --clients 4 --n 4 --requests 1 --max-tokens 64 \
    --prompt-tokens 2000 --json "$RESULTS/load.json"
}

run_load_mixed() {  # the server surviving its users: 8 clients x 50 requests mixing valid, oversized, malformed and
  # cancelled requests, streamed and not, on torch and llama.cpp; every response checked, RSS against the budget
  python3 benchmarks/load_mixed.py --backends torch,llama.cpp --clients 8 --requests 50 --out "$RESULTS"
}

ACCEPT_METHODS=stand,stand-dynamic,recycle,pld,suffix

run_acceptance() {  # tokens accepted per step (A) at equal node budgets (--cost off --nodes K), held-out CHAMP, T=0.6 and 0;
  # n=1 on PROBLEMS problems; n=1 and n=8 (the samples of a question share STAND's table) on the first PROBLEMS8 of
  # them, so n=8 compares with n=1 on the same problems; then tok/s with this machine's cost grid (each method sized
  # by it), the same problems at T=0.6
  local first=${FIRST:-240} problems=${PROBLEMS:-8} problems8=${PROBLEMS8:-4} tokens=${TOKENS:-768}
  local common=(--backend torch --dtype "$DTYPE" --dataset champ --first "$first" --max-new-tokens "$tokens" --seed 0)
  for t in ${TEMPS:-0.6 0}; do
    for k in ${BUDGETS:-24 64}; do
      stand bench "${common[@]}" --methods "$ACCEPT_METHODS" --problems "$problems" --n 1 --temperature "$t" \
        --cost off --nodes "$k" --json "$RESULTS/n1_t${t}_k$k.json" | tee -i "$RESULTS/n1_t${t}_k$k.txt"
      table "$RESULTS/n1_t${t}_k$k"
      stand bench "${common[@]}" --methods "$ACCEPT_METHODS,consensus" --problems "$problems8" --n 1,8 \
        --temperature "$t" --cost off --nodes "$k" --json "$RESULTS/n8_t${t}_k$k.json" | tee -i "$RESULTS/n8_t${t}_k$k.txt"
      table "$RESULTS/n8_t${t}_k$k"
    done
  done
  [ "${SPEED:-1}" = 1 ] || return 0  # SPEED=0: A only
  stand bench "${common[@]}" --methods "none,$ACCEPT_METHODS" --problems "$problems" --n 1 --temperature 0.6 \
    --repeats "$REPEATS" --json "$RESULTS/speed_n1.json" | tee -i "$RESULTS/speed_n1.txt"
  table "$RESULTS/speed_n1"
  stand bench "${common[@]}" --methods "none,$ACCEPT_METHODS,consensus" --problems "$problems8" --n 8 \
    --temperature 0.6 --repeats "$REPEATS" --json "$RESULTS/speed_n8.json" | tee -i "$RESULTS/speed_n8.txt"
  table "$RESULTS/speed_n8"
}

run_sharing() {  # what one table shared by the N samples of a question buys, against one sample alone measured over
  # as many samples: `stand[shared=false]` at the largest N is N independent single samples (a table each: the draws
  # of N runs at n=1); the samples of a question sharing one table at each N of NS, in one batch (lockstep) and one
  # after another (each sample drafting from what the earlier ones wrote); A at --cost off --nodes K, T=0.6
  local first=${FIRST:-240} problems=${PROBLEMS8:-4} tokens=${TOKENS:-512} k=${BUDGET:-24} ns=${NS:-4,8,16}
  local common=(--backend torch --dtype "$DTYPE" --dataset champ --first "$first" --problems "$problems"
                --max-new-tokens "$tokens" --seed 0 --temperature 0.6 --cost off --nodes "$k")
  stand bench "${common[@]}" --n "${ns##*,}" --methods "stand[shared=false]" --json "$RESULTS/alone.json" \
    | tee -i "$RESULTS/alone.txt"
  table "$RESULTS/alone"
  for schedule in batched sequential; do
    stand bench "${common[@]}" --n "$ns" --schedule "$schedule" --methods stand --json "$RESULTS/$schedule.json" \
      | tee -i "$RESULTS/$schedule.txt"
    table "$RESULTS/$schedule"
  done
}

run_overlap() {  # how much the N samples of a question repeat each other, by where a k-gram was written before: the
  # prompt or the sample's own text, the other samples' text before the same position (a batch), every earlier
  # sample (one after another), any other sample; plain decoding (BACKEND, default llama.cpp: the fastest plain n=8)
  local ns=${NS:-8}  # a list, as for sharing: its largest N
  python3 -m stand.lab.overlap --dataset champ --first "${FIRST:-240}" --problems "${PROBLEMS8:-4}" \
    --n "${ns##*,}" --max-new-tokens "${TOKENS:-512}" --backend "${BACKEND:-llama.cpp}" --orders 2,3,4,5 \
    --json "$RESULTS/overlap.json" | tee -i "$RESULTS/overlap.txt"
}

run_replay() {  # drafters on the same sampled texts (python -m stand.lab.replay): held-out CHAMP, T=0.6, 768 tokens;
  # n=1 at 24 and 64 nodes a step, then N samples a question replayed alone and as one batch (--schedules sequential
  # replays them one after another) with STAND's table rules (the default: each sample's own latest beside the
  # question's running mean, six-token keys, refill and reserve; then four-token keys, without reserve, without
  # refill, the running mean alone, the latest alone), one after another, then T=0 at n=1
  local first=${FIRST:-240} problems=${PROBLEMS:-16} problems8=${PROBLEMS8:-8} tokens=${TOKENS:-768} ns=${NS:-8}
  local common=(--dataset champ --first "$first" --max-new-tokens "$tokens" --dtype "$DTYPE")
  local plain='stand[reserve=0]' keys4='stand[max_n=4]' fill='stand[refill=false]'
  local mean='stand[own_latest=false;refill=false]'
  python3 -m stand.lab.replay "${common[@]}" --temperature 0.6 --problems "$problems" --traces "$RESULTS/traces_n1.json" \
    --variants "stand:64,$plain:64,recycle:64,pld:64,stand:24,$keys4:24,$plain:24,$fill:24,$mean:24,recycle:24,pld:24" \
    --json "$RESULTS/n1.json" | tee -i "$RESULTS/n1.txt"
  python3 -m stand.lab.replay "${common[@]}" --temperature 0.6 --problems "$problems8" --samples "${ns##*,}" \
    --traces "$RESULTS/traces_n${ns##*,}.json" --schedules alone,batched \
    --variants "stand:24,$keys4:24,$plain:24,$fill:24,$mean:24,stand[own_latest=false;refill=false;recency=1]:24" \
    --json "$RESULTS/shared.json" | tee -i "$RESULTS/shared.txt"
  python3 -m stand.lab.replay "${common[@]}" --temperature 0.6 --problems "$problems8" --samples "${ns##*,}" \
    --traces "$RESULTS/traces_n${ns##*,}.json" --variants "stand:24,$keys4:24" --schedules sequential \
    --json "$RESULTS/shared_sequential.json" | tee -i "$RESULTS/shared_sequential.txt"
  python3 -m stand.lab.replay "${common[@]}" --temperature 0.6 --problems "$problems8" --samples "${ns##*,}" \
    --traces "$RESULTS/traces_n${ns##*,}.json" --variants recycle:24,suffix:24 --schedules batched \
    --json "$RESULTS/shared_others.json" | tee -i "$RESULTS/shared_others.txt"
  python3 -m stand.lab.replay "${common[@]}" --temperature 0 --problems "$problems" --traces "$RESULTS/traces_n1_t0.json" \
    --variants "stand:24,$plain:24,pld:24,recycle:24,stand:64,$plain:64,pld:64,recycle:64" \
    --json "$RESULTS/n1_t0.json" | tee -i "$RESULTS/n1_t0.txt"
}

run_ablation() {  # STAND's parts, one at a time, by A at an equal budget (--cost off --nodes 24), tuning problems
  # CHAMP 100+ (never the held-out ones), T=0.6: n=1, then n=8 with the table shared by the samples or not
  local first=${FIRST:-100} problems=${PROBLEMS:-3} problems8=${PROBLEMS8:-2} tokens=${TOKENS:-384} k=${BUDGET:-24}
  local common=(--backend torch --dtype "$DTYPE" --dataset champ --first "$first" --max-new-tokens "$tokens" --seed 0
                --temperature 0.6 --cost off --nodes "$k")
  stand bench "${common[@]}" --problems "$problems" --n 1 --methods \
    "stand,stand[stochastic=false],stand[recency=1],stand[learn_drafts=false],stand[prompt=false],stand[max_n=2],stand-heuristic,recycle,pld" \
    --json "$RESULTS/n1.json" | tee -i "$RESULTS/n1.txt"
  table "$RESULTS/n1"
  stand bench "${common[@]}" --problems "$problems8" --n 8 --methods "stand,stand[shared=false]" \
    --json "$RESULTS/n8.json" | tee -i "$RESULTS/n8.txt"
  table "$RESULTS/n8"
}

run_calibrate() {  # the shipped STAND tree: a 600-node template counted over long traces of tuning problems (CHAMP
  # 100+, n=1, T=0.6), the 80 most accepted nodes kept; GRID=file: M chosen again with that cost grid (tree.json);
  # copy the tree to src/stand/data/ to ship it
  stand calibrate --backend torch --dtype "${DTYPE/auto/bfloat16}" --dataset champ --first "${FIRST:-100}" \
    --problems "${PROBLEMS:-12}" --max-new-tokens "${TOKENS:-768}" --template-size 600 --keep 80 --temperature 0.6 \
    --out "$RESULTS/tree_n1.json" --plot "$RESULTS/tree_n1.png" 2>&1 | tail -n 3 | tee -i "$RESULTS/calibrate.txt"
  if [ -n "${GRID:-}" ]; then  # M chosen again from the same counts with a grid measured on an idle machine
    cp "$GRID" "$RESULTS/grid.json"
    stand calibrate --backend torch --dtype int4 --counts "$RESULTS/tree_n1.json" --cost "$RESULTS/grid.json" \
      --out "$RESULTS/tree.json" --plot "$RESULTS/tree.png" 2>&1 | tail -n 1 | tee -a "$RESULTS/calibrate.txt"
  fi
}

run_calibrate_replay() {  # the tree calibrated on fixed texts: tuning CHAMP 113+ (n=1, T=0.6, 768 tokens) sampled once
  # (kept as traces.json: reused when present), a 200-node template replayed over them with the latest-distribution
  # table, every node counted by its exact chance of acceptance, M chosen with GRID (default: the shipped tree's grid)
  local first=${FIRST:-112} problems=${PROBLEMS:-16}
  python3 -m stand.lab.replay --dataset champ --first "$first" --problems "$problems" --max-new-tokens "${TOKENS:-768}" \
    --temperature 0.6 --dtype "${DTYPE/auto/bfloat16}" --traces "$RESULTS/traces.json" --variants ''
  python3 -c 'import json, sys; json.dump(json.load(open(sys.argv[1]))["provenance"]["cost_grid"], open(sys.argv[2], "w"))' \
    src/stand/data/smollm2-135m-instruct.tree.json "$RESULTS/shipped_grid.json"
  stand calibrate --backend torch --dtype "${DTYPE/auto/bfloat16}" --dataset champ --first "$first" --problems "$problems" \
    --traces "$RESULTS/traces.json" --method "${METHOD:-stand[recency=1]}" --max-new-tokens "${TOKENS:-768}" \
    --temperature 0.6 --template-size 200 --keep 80 --cost "${GRID:-$RESULTS/shipped_grid.json}" \
    --out "$RESULTS/tree.json" --plot "$RESULTS/tree.png" 2>&1 | tail -n 1 | tee -i "$RESULTS/calibrate.txt"
}

run_smoke() {  # one problem, 32 tokens, every main method: checks the pipeline in a few minutes (into /tmp)
  stand bench --methods "$MAIN_METHODS" --dataset champ --problems 1 --n 1,2 --temperature 0.6 \
    --max-new-tokens 32 --dtype "$DTYPE" --json "$RESULTS/smoke.json" --plot "$RESULTS/plots"
  python3 -m stand.lab.report "$RESULTS/smoke.json"
  echo "smoke results in $RESULTS"
}

NAMES=$(declare -F | awk '$3 ~ /^run_/ {sub(/^run_/, "", $3); gsub(/_/, "-", $3); print $3}')
WHAT=${1:-}
if [ -z "$WHAT" ] || ! declare -F "run_${WHAT//-/_}" > /dev/null; then
  echo "usage: $0 NAME   (writes benchmarks/results/NAME/); names:" $NAMES >&2
  exit 2
fi
if [ "$WHAT" = smoke ]; then
  RESULTS=$(mktemp -d /tmp/stand-bench-smoke.XXXX)
else
  RESULTS=benchmarks/results/${RUN:-$WHAT}
  mkdir -p "$RESULTS"
fi
machine "${RUN:-$WHAT}" > "$RESULTS/machine.txt"
"run_${WHAT//-/_}"
