#!/usr/bin/env bash
# The reduced runs behind the README's current figures (the full benchmarks/run.sh main takes hours on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/results
stand bench --methods none,pld,recycle,stand,consensus,ngrammys,stand+consensus,hf,hf-pld --dataset champ \
  --problems 3 --n 1 --temperature 0.6 --max-new-tokens 256 --seed 0 --json $OUT/n1.json --plot $OUT/n1 | tee $OUT/n1.txt
stand bench --methods none,pld,recycle,stand,consensus,ngrammys,stand+consensus,hf,hf-batched --dataset champ \
  --problems 2 --n 8 --schedule batched --temperature 0.6 --max-new-tokens 256 --seed 0 --json $OUT/n8.json \
  --plot $OUT/n8 | tee $OUT/n8.txt
