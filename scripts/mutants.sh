#!/usr/bin/env bash
# Mutation check of the lossless promise. Each mutant is one small change, made in a copy of src/, that
# breaks exact sampling (or greedy equality): the fast tests chosen for it run against the copy (PYTHONPATH) and
# must fail ("killed"). Tests that still pass: "survived". A mutant whose text no longer occurs exactly once in
# src: "stale" (this script needs updating). The chosen tests must pass on the unmutated copy first ("baseline").
# Exits non-zero unless the baseline passes and every mutant is killed.
#
#   scripts/mutants.sh            all mutants
#   scripts/mutants.sh NAME...    only these (names as in the table below)
#   MUTANTS_BASELINE=0            skips the baseline (when the suite has just passed on this src)
#   MUTANTS_JOBS=N                mutants run N at a time (default 2; each test process uses one thread)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d "${TMPDIR:-/tmp}/stand-mutants.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
JOBS=${MUTANTS_JOBS:-2}

# test selections, run in the order given, with -x (the first failure kills): engine-level exactness checks on the
# Hugging Face forward with drafts made wrong on purpose (tests/lossless.py), the truncated sampler, greedy equality
E=tests/test_lossless_engine.py
STAND=("$E::test_wrong_drafts_stay_exact[hf-stand-skewed-T1]" "$E::test_wrong_drafts_stay_exact[hf-stand-dynamic-skewed-T1]"
       "$E::test_wrong_drafts_stay_exact[hf-stand+consensus-2-2-skewed-T1]")
ONE_HOT=("$E::test_wrong_drafts_stay_exact[hf-consensus-1-6-1-perturbed-T1]"
         "$E::test_wrong_drafts_stay_exact[hf-stand-False-skewed_perturbed-T1]" "${STAND[@]}")
TRUNCATED=("$E::test_engine_distribution_is_exact[hf-pld-T0.7-k5-p0.9]"
           "$E::test_wrong_drafts_stay_exact[hf-consensus-1-6-1-perturbed-T0.7-k5-p0.9]"
           "$E::test_engine_distribution_is_exact[hf-stand-T0.7-k5-p0.9]")
GREEDY=("tests/test_stand.py::test_greedy_equals_plain" "tests/test_engine.py::test_greedy_pld_equals_none_and_hf_batched")
# where rows end and drafts are cut, and the verifier's rounding fallbacks (unit tests and the tiny model); stop
# strings inside accepted drafts; the best-first drafter's worth; refill; one failing row among others
EDGES=(tests/test_truncations.py)
STOPS=(tests/test_stop_in_draft.py)
BEST=("tests/test_stand.py::test_best_first_draft_follows_worth")
REFILL=("tests/test_stand_knobs.py::test_refill_spends_the_nodes_a_template_leaves_unfilled"
        "$E::test_wrong_drafts_stay_exact[hf-stand-True-skewed-T1]")
FAULTS=("tests/test_server_faults.py::test_one_failing_step_engine_run_still_raises")
S=tests/test_search.py
SEARCH=("$S::test_cut_step_drops_what_a_pass_accepted_beyond_the_delimiter"
        "$S::test_every_step_follows_the_model_under_every_drafter[hf-none]"
        "$S::test_every_step_follows_the_model_under_every_drafter[hf-stand-skewed]")
CONTINUED=("$S::test_a_continued_row_decodes_as_if_its_prompt_were_prefilled[none-hf]"
           "$S::test_a_continued_row_decodes_as_if_its_prompt_were_prefilled[stand-hf]")

# name | file under src/stand | text | replacement | selection (an array above)
MUTANTS=$(cat <<'EOF'
unrenormalised-q|core/verify.py|keep = ~np.isin(q.ids, drawn)|keep = np.ones(len(q.ids), dtype=bool)|STAND
bonus-from-p|core/verify.py|return Verdict(accepted, _draw(p, p.sum(), rng))|return Verdict(accepted, _draw(probs[node].double().numpy(), 1.0, rng))|ONE_HOT
accept-always|core/verify.py|if rng.random() * q_tok < p[tok] / total:|if True:|ONE_HOT
residual-unnormalised|core/verify.py|if rng.random() * q_tok < p[tok] / total:|if rng.random() * q_tok < p[tok]:|ONE_HOT
no-residual|core/verify.py|p[ids] = np.maximum(p[ids] / total - qp, 0.0) * total|pass|ONE_HOT
top-p-off-by-one|core/verify.py|before = torch.cumsum(sorted_p, dim=-1) - sorted_p|before = torch.cumsum(sorted_p, dim=-1)|TRUNCATED
top-k-off-by-one|core/verify.py|kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]|kth = torch.topk(x, params.top_k, dim=-1).values[..., -2:-1]|TRUNCATED
temperature-inverted|core/verify.py|x = x / params.temperature|x = x * params.temperature|TRUNCATED
greedy-first-child|core/verify.py|if tree.tokens[c - 1] == argmax[node]), None)|), None)|GREEDY
gumbel-noise-reused|drafters/draws.py|self.pos += n|self.pos += 0|STAND
noise-seed-shared|drafters/stand.py|seed = int(row.rng.integers(2**63))|seed = 0|STAND
draft-from-q-squared|drafters/draws.py|keys = -q if deterministic else -(np.log(q) + noise.take(len(q)))|keys = -q if deterministic else -(2 * np.log(q) + noise.take(len(q)))|STAND
verify-against-row-0|engine.py|self._verify(r, t, logits[b], learns)|self._verify(r, t, logits[0], learns)|ONE_HOT
commit-first-nodes|engine.py|cache.commit([[0] + v.accepted[: k - 1] for v, k in zip(verdicts, kept)])|cache.commit([[0] + list(range(1, k)) for v, k in zip(verdicts, kept)])|GREEDY
commit-dropped-tokens|engine.py|cache.commit([[0] + v.accepted[: k - 1] for v, k in zip(verdicts, kept)])|cache.commit([[0] + v.accepted for v in verdicts])|STOPS
append-eos-inverted|core/sequence.py|if tok in eos_ids and not self.params.ignore_eos:|if tok in eos_ids and self.params.ignore_eos:|EDGES
append-length-late|core/sequence.py|if len(self.tokens) - self.prompt_len >= self.params.max_new_tokens:|if len(self.tokens) - self.prompt_len > self.params.max_new_tokens:|EDGES
stop-cut-late|core/sequence.py|del self.tokens[end:]|del self.tokens[end + 1:]|STOPS
stop-after-length|core/sequence.py|self._cut_at_stop(start, decode)|self.done or self._cut_at_stop(start, decode)|STOPS
stop-first-token-missed|core/sequence.py|for end in range(start + 1, len(self.tokens) + 1):|for end in range(start + 2, len(self.tokens) + 1):|STOPS
room-no-bonus|core/sequence.py|max_len - len(self.tokens)) - 1, 0)|max_len - len(self.tokens)), 0)|EDGES
clip-one-short|core/tree.py|return self.subtree(self.depths() <= max_depth)|return self.subtree(self.depths() < max_depth)|EDGES
prefix-one-long|core/tree.py|return self.subtree(np.arange(len(self)) < k)|return self.subtree(np.arange(len(self)) <= k)|EDGES
max-leaves-one-more|core/tree.py|if grows and leaves + 1 > k and leaves > 0:|if grows and leaves > k and leaves > 0:|EDGES
engine-clip-skipped|engine.py|tree = tree.clip(r.room(self.target.max_len))|tree = tree.clip(r.room(self.target.max_len) + 8)|EDGES
engine-share-one-long|engine.py|tree = tree if cap is None else tree.prefix(cap)|tree = tree if cap is None else tree.prefix(cap + 1)|EDGES
fit-leaves-one-more|engine.py|max((seqs - len(self.parked) - rows) // rows, 0) + 1)|max((seqs - len(self.parked) - rows) // rows, 0) + 2)|EDGES
fit-tokens-no-root|engine.py|t.prefix(max(tokens // rows - 1, 0))|t.prefix(max(tokens // rows, 0))|EDGES
graft-follows-last|core/tree.py|nodes.setdefault(key, i)|nodes[key] = i|EDGES
graft-parent-unmapped|core/tree.py|key = (-1 if par < 0 else where[par], tok)|key = (par, tok)|EDGES
best-first-child-worth|drafters/draws.py|self.open(idx, tail[1:] + (int(drawn[rank]),), -neg)|self.open(idx, tail[1:] + (int(drawn[rank]),), worth)|BEST
best-first-sibling-worth|drafters/draws.py|(-worth * sorted_q[rank + 1], next(self.tick), node, rank + 1)|(-worth * sorted_q[rank], next(self.tick), node, rank + 1)|BEST
best-first-floor-ignored|drafters/draws.py|if -neg < floor:|if -neg < 0.0:|BEST
refill-redraws-used-ranks|drafters/stand.py|grower.open(node - 1, tail, worth[node], d, len(kids[node]))|grower.open(node - 1, tail, worth[node], d, 0)|REFILL
residual-fallback-keeps-rejected|core/verify.py|rejected = [tree.tokens[k - 1] for k in kids[node][: kids[node].index(c) + 1]]|rejected = [tree.tokens[k - 1] for k in kids[node][: kids[node].index(c)]]|EDGES
draw-past-the-end|core/verify.py|return int(np.flatnonzero(np.diff(c, prepend=0.0) > 0)[-1])|return len(c) - 1|EDGES
isolation-fails-everyone|engine.py|                    self._pass(part, self._rebuilt(part), on_commit)|                    raise error|FAULTS
step-cut-late|tts/search.py|cut, text = hit, target.decode(gen[:hit])|cut, text = min(hit + 1, cut), target.decode(gen[:hit])|SEARCH
rows-share-a-stream|tts/search.py|index=q.rows, logprobs=[]|index=q.rows % 3, logprobs=[]|SEARCH
reuse-one-cell-more|engine.py|return (parked.handle, k) if k else None|return (parked.handle, k + 1) if k else None|CONTINUED
EOF
)

apply() {  # apply FILE TEXT REPLACEMENT: exactly one occurrence, else exit 3
    python3 - "$@" <<'EOF'
import sys
path, old, new = sys.argv[1:]
src = open(path).read()
if src.count(old) != 1:
    sys.exit(3)
open(path, "w").write(src.replace(old, new))
EOF
}

run_tests() {  # run_tests COPY SELECTION...: pytest's exit code; its output in COPY/pytest.log
    local copy=$1
    shift
    PYTHONPATH="$copy/src" python3 -c 'import stand, sys; sys.exit(not stand.__file__.startswith(sys.argv[1]))' \
        "$copy/src" || { echo "stand is not imported from $copy/src" >"$copy/pytest.log"; return 4; }
    PYTHONPATH="$copy/src" python3 -m pytest -x -q -p no:cacheprovider -m "not slow" "$@" >"$copy/pytest.log" 2>&1
}

fresh_copy() {  # fresh_copy NAME: a copy of src under WORK/NAME
    mkdir -p "$WORK/$1" && cp -r "$ROOT/src" "$WORK/$1/src" && echo "$WORK/$1"
}

first_failure() {  # the first failed test and the first line of its error
    local log=$1/pytest.log
    echo "$(grep -m1 -oE '^FAILED [^ ]+' "$log" | cut -c8- | sed 's/^tests\///'): $(grep -m1 -E '^E ' "$log" | sed -E 's/^E +//' | cut -c1-100)"
}

mutant() {  # mutant NAME FILE TEXT REPLACEMENT SELECTION: one result line
    local name=$1 file=$2 old=$3 new=$4 sel="$5[@]" t0=$SECONDS copy
    copy=$(fresh_copy "$name")
    if ! apply "$copy/src/stand/$file" "$old" "$new"; then
        echo "stale     $name: its text is not in src/stand/$file exactly once"
        return
    fi
    run_tests "$copy" "${!sel}"
    case $? in
        0) echo "survived  $name: the $5 tests pass ($((SECONDS - t0)) s)" ;;
        1) echo "killed    $name ($((SECONDS - t0)) s) by $(first_failure "$copy")" ;;
        *) echo "error     $name: $(tail -3 "$copy/pytest.log" | tr '\n' ' ')" ;;
    esac
}

start=$SECONDS
if [[ "${MUTANTS_BASELINE:-1}" != 0 ]]; then
    copy=$(fresh_copy baseline)
    if ! run_tests "$copy" "${STAND[@]}" "${ONE_HOT[@]:0:2}" "${TRUNCATED[@]}" "${GREEDY[@]}" "${EDGES[@]}" "${STOPS[@]}" \
            "${BEST[@]}" "${REFILL[@]}" "${FAULTS[@]}" "${SEARCH[@]}" "${CONTINUED[@]}"; then
        echo "baseline: the chosen tests fail on unmutated src: $(first_failure "$copy")"
        exit 1
    fi
    echo "baseline: the chosen tests pass on unmutated src ($((SECONDS - start)) s)"
fi

mkdir -p "$WORK/results"
i=0
while IFS='|' read -r name file old new sel; do
    [[ $# -gt 0 && ! " $* " =~ " $name " ]] && continue
    while (($(jobs -rp | wc -l) >= JOBS)); do wait -n; done
    i=$((i + 1))
    mutant "$name" "$file" "$old" "$new" "$sel" >"$WORK/results/$(printf %02d $i)" &
done <<<"$MUTANTS"
wait
cat "$WORK"/results/* 2>/dev/null
echo "mutants: $((SECONDS - start)) s"
! grep -qvE '^killed ' "$WORK"/results/* 2>/dev/null && [[ $i -gt 0 ]]
