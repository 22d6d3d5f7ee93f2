#!/usr/bin/env bash
# Mutation check of the lossless promise (issue 15). Each mutant is one small change, made in a copy of src/, that
# breaks exact sampling (or greedy equality): the fast tests chosen for it run against the copy (PYTHONPATH) and
# must fail ("killed"). Tests that still pass: "survived". A mutant whose text no longer occurs exactly once in
# src: "stale" (the script needs updating). The chosen tests must pass on the unmutated copy first ("baseline").
# Exits non-zero unless the baseline passes and every mutant is killed.
#
#   scripts/mutants.sh            all mutants
#   scripts/mutants.sh NAME...    only these (names as in the table below)
#   MUTANTS_BASELINE=0            skips the baseline (when the suite has just passed on this src)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d "${TMPDIR:-/tmp}/stand-mutants.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# test selections (run with -x: the first failure kills); engine-level checks on the Hugging Face forward
WRONG=(tests/test_lossless_engine.py -k "test_wrong_drafts_stay_exact and hf- and T1")
TRUNCATED=(tests/test_lossless_engine.py -k "hf- and T0.7")
GREEDY=(tests/test_engine.py tests/test_stand.py -k "greedy")

# name | file under src/stand | text | replacement | selection (an array above)
MUTANTS=$(cat <<'EOF'
unrenormalised-q|core/verify.py|keep = ~np.isin(q.ids, drawn)|keep = np.ones(len(q.ids), dtype=bool)|WRONG
bonus-from-p|core/verify.py|return Verdict(accepted, _draw(p, p.sum(), rng))|return Verdict(accepted, _draw(probs[node].double().numpy(), 1.0, rng))|WRONG
accept-always|core/verify.py|if rng.random() * q_tok < p[tok] / total:|if True:|WRONG
residual-unnormalised|core/verify.py|if rng.random() * q_tok < p[tok] / total:|if rng.random() * q_tok < p[tok]:|WRONG
no-residual|core/verify.py|p[ids] = np.maximum(p[ids] / total - qp, 0.0) * total|pass|WRONG
top-p-off-by-one|core/verify.py|before = torch.cumsum(sorted_p, dim=-1) - sorted_p|before = torch.cumsum(sorted_p, dim=-1)|TRUNCATED
top-k-off-by-one|core/verify.py|kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]|kth = torch.topk(x, params.top_k, dim=-1).values[..., -2:-1]|TRUNCATED
temperature-inverted|core/verify.py|x = x / params.temperature|x = x * params.temperature|TRUNCATED
greedy-first-child|core/verify.py|if tree.tokens[c - 1] == argmax[node]), None)|), None)|GREEDY
gumbel-noise-reused|drafters/stand.py|self.pos += n|self.pos += 0|WRONG
noise-seed-shared|drafters/stand.py|seed = int(row.rng.integers(2**63))|seed = 0|WRONG
draft-from-q-squared|drafters/stand.py|keys = -q if deterministic else -(np.log(q) + noise.take(len(q)))|keys = -q if deterministic else -(2 * np.log(q) + noise.take(len(q)))|WRONG
commit-first-nodes|engine.py|cache.commit([[0] + v.accepted for v in verdicts])|cache.commit([[0] + list(range(1, len(v.accepted) + 1)) for v in verdicts])|WRONG
EOF
)

apply() {  # apply FILE TEXT REPLACEMENT: exactly one occurrence, or exit 3
    python3 - "$@" <<'EOF'
import sys
path, old, new = sys.argv[1:]
src = open(path).read()
if src.count(old) != 1:
    sys.exit(3)
open(path, "w").write(src.replace(old, new))
EOF
}

run_tests() {  # run_tests COPY SELECTION-NAME: pytest's exit code
    local copy=$1 sel="$2[@]"
    PYTHONPATH="$copy/src" python3 -c 'import stand, sys; sys.exit(not stand.__file__.startswith(sys.argv[1]))' \
        "$copy/src" || { echo "stand is not imported from $copy/src" >&2; return 4; }
    PYTHONPATH="$copy/src" python3 -m pytest -x -q -p no:cacheprovider -m "not slow" "${!sel}" \
        >"$copy/pytest.log" 2>&1
}

fresh_copy() {
    rm -rf "$WORK/copy" && mkdir -p "$WORK/copy" && cp -r "$ROOT/src" "$WORK/copy/src" && echo "$WORK/copy"
}

failed=0
start=$SECONDS
if [[ "${MUTANTS_BASELINE:-1}" != 0 ]]; then
    copy=$(fresh_copy)
    for sel in WRONG TRUNCATED GREEDY; do
        if ! run_tests "$copy" "$sel"; then
            echo "baseline: the $sel tests fail on unmutated src ($copy/pytest.log):"
            tail -20 "$copy/pytest.log"
            exit 1
        fi
    done
    echo "baseline: the chosen tests pass on unmutated src ($((SECONDS - start)) s)"
fi

while IFS='|' read -r name file old new sel; do
    [[ $# -gt 0 && ! " $* " =~ " $name " ]] && continue
    t0=$SECONDS
    copy=$(fresh_copy)
    if ! apply "$copy/src/stand/$file" "$old" "$new"; then
        echo "stale     $name: its text is not in src/stand/$file exactly once"
        failed=1
        continue
    fi
    run_tests "$copy" "$sel"
    rc=$?
    case $rc in
        0) echo "survived  $name ($sel tests pass, $((SECONDS - t0)) s)"; failed=1 ;;
        1) echo "killed    $name by $(grep -m1 -oE '^FAILED [^ ]+' "$copy/pytest.log" | cut -c8-) ($((SECONDS - t0)) s)" ;;
        *) echo "error     $name: pytest exit code $rc"; tail -5 "$copy/pytest.log"; failed=1 ;;
    esac
done <<<"$MUTANTS"
echo "mutants: $((SECONDS - start)) s"
exit $failed
