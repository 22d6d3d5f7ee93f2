#!/usr/bin/env bash
# Session 2 figures (float32, 2-core AMD EPYC, idle machine). Calibration: CHAMP problems 1-20 (indices 0-19);
# every CHAMP evaluation below uses problems 21-25 (indices 20-24), which calibration never saw.
set -euo pipefail
cd "$(dirname "$0")"
B="stand bench --dataset champ --first 20 --max-new-tokens 256"
# tree calibration (the shipped tree): counts, then M chosen again on a grid measured with 9 repeats
#   stand calibrate --problems 20 --max-new-tokens 128 --cost grid1.json --out tree20k.json
#   stand calibrate --counts tree20k.json --cost grid.json --out src/stand/data/smollm2-135m-instruct.tree.json
[ -n "${ONLY:-}" ] || {
$B --methods none,pld,recycle,stand,stand-heuristic --problems 5 -t 0.6 --json n1_t06.json > n1_t06.txt
$B --methods none,stand,stand-heuristic,consensus --n 8 --problems 3 -t 0.6 --json n8_t06.json > n8_t06.txt
}
stand bench --dataset humaneval --methods none,stand,stand-heuristic --problems 5 --max-new-tokens 256 -t 0.6 --json ood_humaneval.json > ood_humaneval.txt
rm -f warm.ngram
$B --methods stand --problems 5 -t 0.6 --table warm.ngram --json table_cold.json > table_cold.txt
$B --methods stand --problems 5 -t 0.6 --table warm.ngram --json table_warm.json > table_warm.txt
rm -f warm.ngram
$B --methods stand --problems 5 -t 0 --table warm.ngram --json table_cold_t0.json > table_cold_t0.txt
$B --methods stand --problems 5 -t 0 --table warm.ngram --json table_warm_t0.json > table_warm_t0.txt
rm -f warm.ngram
$B --methods none,pld,recycle,stand --problems 5 -t 0 --json n1_t0.json > n1_t0.txt
python ../../profile/linear_chain.py > linear_chain.txt
# stand-dynamic beside stand (second runs of the rows above)
$B --methods none,stand,stand-dynamic --problems 5 -t 0.6 --json dyn_n1_t06.json > dyn_n1_t06.txt
$B --methods none,stand,stand-dynamic --n 8 --problems 3 -t 0.6 --json dyn2_n8_t06.json > dyn2_n8_t06.txt
$B --methods none,pld,stand,stand-dynamic --problems 5 -t 0 --json dyn_n1_t0.json > dyn_n1_t0.txt
# (dyn2_n1_t0 and dyn2_n8_t06 were measured with a variant that calibrated node worth online by acceptance per
#  worth bin: 1.45x none at T=0 (1.79 tokens/step) and 0.73x at n=8, worse than without it, so it was reverted)
