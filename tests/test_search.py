"""Tree search (beam search, DVTS) on tiny random models: which beams survive, that subtrees stay apart, that finished
beams stop, where steps are cut, that every step is drawn from the model's distribution under every drafter, the
reward-model scorer, and the user's mistakes."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from extras import require, require_method
from typer.testing import CliRunner

from lossless import PROMPT, TRUNCATED, V, exact_joint, pvalue, skewed, small_gguf, small_target
from stand.cli import app
from stand.core.sequence import Row
from stand.drafters.registry import make_drafter
from stand.engine import Engine
from stand.errors import StandError
from stand.methods import names
from stand.params import SamplingParams, SpecConfig
from stand.tts import report
from stand.tts.scorers import RewardModel
from stand.tts.search import Beam, Question, SearchConfig, Step, cut_step, draw_steps
from stand.tts.solve import solve

QUESTION = "abcabc 12 12 hello"
PARAMS = SamplingParams(0.8, max_new_tokens=40, seed=0)


def by_text(question: str, steps: list[str], step: str) -> float:
    """A deterministic scorer: a fixed function of the step's text."""
    return float(sum(step.encode()) % 97)


def run(tiny, strategy: str, n: int = 8, width: int = 4, method: str = "none", scorer=by_text, **search):
    search = {"delimiter": "a", "step_tokens": 6, "rounds": 6} | search
    return solve(QUESTION, model=tiny, n=n, strategy=strategy, spec=SpecConfig(method), params=PARAMS, chat=False,
                 scorer=scorer, search=SearchConfig(width=width, **search))[0]


def candidates(sol) -> dict[int, dict]:
    return {c["beam"]: c for rnd in sol.rounds for c in rnd}


@pytest.mark.parametrize("n,width", [(8, 4), (8, 2), (6, 3)])
def test_beam_search_keeps_the_width_best_each_round(tiny, n, width):
    sol = run(tiny, "beam", n, width)
    done = 0
    for r, rnd in enumerate(sol.rounds):
        ranked = sorted(rnd, key=lambda c: (-c["score"], c["beam"]))
        assert [c["beam"] for c in rnd if c["kept"]] == sorted(c["beam"] for c in ranked[:width - done])
        assert all(c["score"] == by_text("", [], c["step"]) for c in rnd)
        live = [c["beam"] for c in rnd if c["kept"] and not c["finished"]]
        done += sum(1 for c in rnd if c["kept"] and c["finished"])
        if r + 1 < len(sol.rounds):  # the next round extends exactly the live survivors, n/width steps each
            parents = [c["parent"] for c in sol.rounds[r + 1]]
            assert sorted(set(parents)) == sorted(live) and all(parents.count(p) == n // width for p in live)
    assert len(sol.rounds[0]) == n and len(sol.samples) <= width


def test_dvts_subtrees_never_merge(tiny):
    n, width = 8, 2
    sol = run(tiny, "dvts", n, width)
    seen = candidates(sol)
    for rnd in sol.rounds:
        for c in rnd:  # a candidate extends its own subtree's head (a root's id is -1 - its subtree)
            parent_subtree = -1 - c["parent"] if c["parent"] < 0 else seen[c["parent"]]["subtree"]
            assert parent_subtree == c["subtree"]
        for t in {c["subtree"] for c in rnd}:
            mine = [c for c in rnd if c["subtree"] == t]
            assert len(mine) == width and len({c["parent"] for c in mine}) == 1
            assert [c["beam"] for c in mine if c["kept"]] == [max(mine, key=lambda c: (c["score"], -c["beam"]))["beam"]]
    assert sorted(s.stats["subtree"] for s in sol.samples) == list(range(n // width))
    for s in sol.samples:  # a final beam's steps are its ancestors' steps, all in its subtree
        chain, beam = [], s.stats["beam"]
        while beam in seen:
            chain.append(seen[beam]["step"])
            assert seen[beam]["subtree"] == s.stats["subtree"]
            beam = seen[beam]["parent"]
        assert [x["text"] for x in s.stats["reasoning_steps"]] == chain[::-1]


def one_in_three(text: str) -> bool:
    """A made-up final answer: a third of the steps have one."""
    return sum(text.encode()) % 3 == 0


@pytest.mark.parametrize("strategy", ["beam", "dvts"])
def test_a_finished_beam_is_not_extended(tiny, strategy):
    sol = run(tiny, strategy, is_final=one_in_three)
    kept = {c["beam"] for rnd in sol.rounds[:-1] for c in rnd if c["finished"] and c["kept"]}
    assert kept, "no beam finished and survived before the last round: the test would not test anything"
    assert not kept & {c["parent"] for rnd in sol.rounds for c in rnd}
    assert all(c["finished"] for rnd in sol.rounds for c in rnd if one_in_three(c["step"]))
    assert {s.finish_reason for s in sol.samples} <= {"answer", "eos", "length", "rounds"}


def test_steps_cut_at_the_delimiter_or_the_step_tokens():
    """The 8-letter model (the end of sequence is token 7): a step ends right after the first "bc", or at the end of
    sequence, or after 6 tokens."""
    target = letters_target()
    params = SamplingParams(1.0, max_new_tokens=100, seed=3)
    steps, _ = search_steps(target, make_drafter(SpecConfig("stand"), V), params, rounds=2, delimiter="bc",
                            step_tokens=6)
    for s in steps:
        if s.end == "delimiter":
            assert s.text.endswith("bc") and "bc" not in s.text[:-1] and len(s.tokens) <= 6
        elif s.end == "step_tokens":
            assert len(s.tokens) == 6 and "bc" not in s.text and V - 1 not in s.tokens
        else:
            assert s.end == "eos" and s.tokens[-1] == V - 1 and V - 1 not in s.tokens[:-1] and "bc" not in s.text
    ends = [s.end for s in steps]
    assert min(ends.count(e) for e in ("delimiter", "step_tokens", "eos")) > 10, ends


def test_cut_step_drops_what_a_pass_accepted_beyond_the_delimiter(tiny):
    prompt = tiny.encode("xy", chat=False)
    row = Row(prompt, SamplingParams(max_new_tokens=20, stop=["\n\n", "STOP"]), logprobs=[])
    row.tokens += tiny.encode("one\n\ntwo", chat=False)
    row.logprobs = [-1.0] * 8
    row.stats.steps = 3
    step = cut_step(row, tiny, "\n\n")
    assert (step.text, step.end, len(step.logprobs), step.passes) == ("one\n\n", "delimiter", 5, 3)
    row.tokens = prompt + tiny.encode("oneSTOP\n\n", chat=False)
    assert (cut_step(row, tiny, "\n\n").text, cut_step(row, tiny, "\n\n").end) == ("oneSTOP", "stop")
    row.tokens = prompt + tiny.encode("abc", chat=False) + [tiny.tokenizer.eos_token_id] + tiny.encode("\n\n", chat=False)
    assert (cut_step(row, tiny, "\n\n").text, cut_step(row, tiny, "\n\n").end) == ("abc", "eos")


def test_greedy_search_is_the_same_tree_with_and_without_drafts(tiny):
    """T=0: every drafter gives the very search plain decoding gives (the same steps, scores and answer)."""
    def tree(method):
        sol = solve(QUESTION, model=tiny, n=4, strategy="beam", spec=SpecConfig(method), chat=False,
                    params=SamplingParams(0.0, max_new_tokens=30), search=SearchConfig(2, "a", 8, 4))[0]
        return [[c["step"] for c in rnd] for rnd in sol.rounds], [[c["score"] for c in rnd] for rnd in sol.rounds]

    steps, scores = tree("none")
    for method in ("stand", "pld", "consensus"):
        got_steps, got_scores = tree(method)  # scores: log-probabilities from wider passes round differently
        assert got_steps == steps and np.allclose(sum(got_scores, []), sum(scores, []), atol=1e-4), method


def test_the_group_table_lives_across_rounds_and_goes_at_the_end(tiny):
    sol = run(tiny, "dvts", method="stand", scorer=None)
    assert sol.passes > 0 and len(sol.rounds) > 1
    engine = Engine(tiny, make_drafter(SpecConfig("stand"), tiny.vocab_size))
    ids = tiny.encode(QUESTION, chat=False)
    engine.hold(7)
    engine.run([Row(ids, PARAMS, group=7, index=0)])
    assert ("group", 7) in engine.drafter.tables  # every row of the round ended: still there
    later = Row(ids + [5, 6], PARAMS, group=7, index=1, question_len=len(ids))
    engine.run([later])
    assert engine.drafter.rows[later.uid].table_key == ("group", 7)
    engine.release(7)
    assert ("group", 7) not in engine.drafter.tables and not engine.drafter.rows


@pytest.mark.parametrize("method", ["consensus", "suffix"])
def test_resumed_rows_share_their_question_group(tiny, method):
    require_method(method)
    drafter = make_drafter(SpecConfig(method), tiny.vocab_size)
    engine = Engine(tiny, drafter)
    ids = tiny.encode(QUESTION, chat=False)
    engine.hold(3)
    first = Row(ids, PARAMS, group=3, index=0)
    engine.run([first])
    later = Row(first.tokens, PARAMS, group=3, index=1, question_len=len(ids))
    assert later.group_key() == first.group_key()
    engine.run([later])
    shared = drafter.groups if method == "consensus" else drafter.caches
    assert list(shared) == [first.group_key()]
    engine.release(3)
    assert not shared


def test_user_scorer_sees_the_question_and_the_steps_so_far(tiny):
    calls = []

    def scorer(question, steps, step):
        calls.append((question, list(steps), step))
        return -len(step)

    sol = run(tiny, "beam", scorer=scorer)
    texts = {c["beam"]: c["step"] for rnd in sol.rounds for c in rnd}
    parents = {c["beam"]: c["parent"] for rnd in sol.rounds for c in rnd}
    assert all(q == QUESTION for q, _, _ in calls) and len(calls) == len(texts)
    for _, steps, step in calls:
        beam = next(b for b, t in texts.items() if t == step and len(steps) == depth(b, parents))
        chain, p = [], parents[beam]
        while p in texts:
            chain.append(texts[p])
            p = parents[p]
        assert steps == chain[::-1]


def depth(beam: int, parents: dict) -> int:
    d, p = 0, parents[beam]
    while p in parents:
        d, p = d + 1, parents[p]
    return d


def test_answer_by_vote_weighs_by_score_and_best_takes_the_top(tiny):
    def answer(text):
        return str(sum(text.encode()) % 2)  # two made-up answers, so the weights decide

    sol = solve(QUESTION, model=tiny, n=8, strategy="beam", params=PARAMS, chat=False, extractor=answer,
                search=SearchConfig(4, "a", 6, 3))[0]
    scores = [s.score for s in sol.samples]
    weights = np.exp(np.array(scores) - max(scores))
    totals = {a: weights[[s.answer == a for s in sol.samples]].sum() for a in "01"}
    assert sol.answer == max(totals, key=totals.get) and sol.vote_share == pytest.approx(max(totals.values()) / weights.sum())
    best = solve(QUESTION, model=tiny, n=8, strategy="beam", params=PARAMS, chat=False, extractor=answer,
                 search=SearchConfig(4, "a", 6, 3, answer_by="best"))[0]
    assert best.chosen == int(np.argmax([s.score for s in best.samples]))
    assert best.answer == best.samples[best.chosen].answer


def test_json_records_every_beam_step_and_score(tiny, tmp_path):
    sol = run(tiny, "dvts", scorer=None)
    report.write_json([sol], tmp_path / "out.json")
    data = json.loads((tmp_path / "out.json").read_text())["solutions"][0]
    assert len(data["rounds"]) == len(sol.rounds) and all({"step", "score", "parent", "kept"} <= set(c)
                                                           for rnd in data["rounds"] for c in rnd)
    assert data["new_tokens"] == sum(c["tokens"] for rnd in data["rounds"] for c in rnd)
    assert all(s["stats"]["reasoning_steps"] for s in data["samples"])


# ---- the reward-model scorer -----------------------------------------------------------------------------------

def reward_model_dir(path, labels: int) -> str:
    """A tiny randomly initialised llama sequence-classification model with the byte tokenizer, written to path."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tiny import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(labels)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=labels,
                         pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    LlamaForSequenceClassification(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("labels", [1, 2])
def test_reward_model_scores_from_its_head_at_the_last_token(tmp_path, labels):
    from transformers import AutoModelForSequenceClassification

    path = reward_model_dir(tmp_path / "rm", labels)
    scorer = RewardModel(path)
    text = scorer.text("2+2?", ["first\n\n"], "so 4")
    assert "2+2?" in text and text.index("first\n\nso 4") > text.index("2+2?")  # the chat template, question first
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = scorer.ids("2+2?", ["first\n\n"], "so 4")
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
        head = model.score(out.hidden_states[-1][0, -1]).float()  # the head at the last token
    want = head[0] if labels == 1 else torch.log_softmax(head, -1)[1]
    assert scorer("2+2?", ["first\n\n"], "so 4") == pytest.approx(float(want), abs=1e-5)
    assert scorer("2+2?", ["first\n\n"], "so 4") != pytest.approx(scorer("2+2?", [], "so 4"), abs=1e-7)


def test_search_with_a_reward_model_directory(tiny, tmp_path):
    path = reward_model_dir(tmp_path / "rm", 1)
    sol = run(tiny, "beam", scorer=path)
    rm = RewardModel(path)
    first = sol.rounds[0][0]
    assert first["score"] == pytest.approx(rm(QUESTION, [], first["step"]), abs=1e-5)


# ---- the user's mistakes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(n=8, search=SearchConfig(width=3)), "width 3 does not divide n 8"),
    (dict(n=4, search=SearchConfig(width=8)), "width 8 is larger than n 4"),
    (dict(search=SearchConfig(delimiter="")), "delimiter must be a non-empty string"),
    (dict(search=SearchConfig(step_tokens=0)), "step_tokens must be"),
    (dict(search=SearchConfig(answer_by="mean")), "answer_by must be one of"),
    (dict(scorer="/no/such/dir"), "not a Hugging Face sequence-classification model directory"),
    (dict(scorer=lambda q, s, t: "high"), "returned 'high', not a number"),
])
def test_search_user_errors(tiny, kw, msg):
    with pytest.raises(StandError, match=msg):
        solve("question", model=tiny, strategy="dvts", params=SamplingParams(0.6, max_new_tokens=8), **kw)


@pytest.mark.parametrize("args,msg", [
    (["--width", "3"], "width 3 does not divide n 8"),
    (["--width", "16"], "width 16 is larger than n 8: it must divide n"),
    (["--step-delimiter", ""], "the step delimiter must be a non-empty string"),
    (["--scorer", "."], "scorer '.' is not a Hugging Face sequence-classification model directory (no config.json in it)"),
])
def test_cli_search_errors_are_one_line(args, msg):
    result = CliRunner().invoke(app, ["solve", "What is 2+3?", "--strategy", "beam", *args])
    assert result.exit_code == 2 and result.output.strip() == f"error: {msg}", result.output


def test_cli_scorer_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = CliRunner().invoke(app, ["solve", "What is 2+3?", "--strategy", "dvts", "--scorer", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: scorer") and result.output.count("\n") == 1


# ---- rows that continue an ended row's cached tokens ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["hf", "lean", "llama.cpp"])
@pytest.mark.parametrize("method", ["none", "stand"])
def test_a_continued_row_decodes_as_if_its_prompt_were_prefilled(backend, method, tmp_path, monkeypatch):
    target = letters_target(backend, tmp_path)
    cache_class = type(target.new_cache())
    copied = []
    real_prefill = cache_class.prefill

    def spy(self, prefixes, on_logits=None, reuse=None):
        copied.extend(k for _, k in filter(None, reuse or []))
        return real_prefill(self, prefixes, on_logits, reuse)

    monkeypatch.setattr(cache_class, "prefill", spy)
    params = SamplingParams(0.0, max_new_tokens=6, ignore_eos=True)
    engine = Engine(target, make_drafter(SpecConfig(method), V))
    engine.hold(0)
    parent = engine.run([Row(PROMPT, SamplingParams(max_new_tokens=5, ignore_eos=True), group=0)])[0]
    prompt = parent.tokens + [3, 1]
    children = engine.run([Row(prompt, params, group=0, index=i, logprobs=[], question_len=len(PROMPT),
                               continues=parent.uid) for i in (1, 2)])
    assert copied == [len(parent.tokens) - 1] * 2  # every cell of the parent's is copied, none computed
    engine.release(0)
    assert not engine.parked
    alone = Engine(target, make_drafter(SpecConfig(method), V)).run([Row(prompt, params, logprobs=[])])[0]
    for child in children:
        assert child.generated == alone.generated
        assert np.allclose(child.logprobs, alone.logprobs, atol=1e-4)


# ---- every step drawn from the model, under every drafter ----------------------------------------------------

class Letters:
    """Text for the 8-token model: token t is the t-th letter, the end-of-sequence token (7) is special."""

    eos_token_id = V - 1

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join("abcdefgh"[i] for i in ids if not (skip_special_tokens and i == self.eos_token_id))


DELIMITER, STEP_TOKENS = "d", 3  # a step ends at token 3 ("d"), at the end of sequence (7), or after 3 tokens


def exact_steps(params: SamplingParams) -> dict[tuple, float]:
    """The probability of every step after PROMPT: the model's 3-token continuations cut where a step ends."""
    joint = exact_joint(params)
    out: dict[tuple, float] = {}
    for seq in itertools.product(range(V), repeat=STEP_TOKENS):
        end = next((i + 1 for i, t in enumerate(seq) if t in (3, V - 1)), STEP_TOKENS)
        out[seq[:end]] = out.get(seq[:end], 0.0) + joint[seq]
    return out


def search_steps(target, drafter, params: SamplingParams, rounds: int = 8, children: int = 250,
                 delimiter: str = DELIMITER, step_tokens: int = STEP_TOKENS):
    """Steps after the fixed beam PROMPT[8:] of the question PROMPT[:8], `rounds` rounds of `children` rows in one
    held group (later rounds draft from everything earlier ones wrote); tokens per pass."""
    engine = Engine(target, drafter)
    q = Question(engine, "q", PROMPT[:8], 0, params, SearchConfig(1, delimiter, step_tokens))
    engine.hold(0)
    parent = engine.run([Row(PROMPT, SamplingParams(max_new_tokens=1), group=0, index=10**6)])[0]
    beam = Beam(0, None, 0, [Step("", PROMPT[8:], [], "delimiter", 0, row=parent.uid)])  # its cells hold PROMPT
    steps = [s for _ in range(rounds) for s in draw_steps(q, [beam], children)[0]]
    assert parent.uid in engine.parked  # every round continued its cached tokens
    engine.release(0)
    assert not engine.parked
    return steps, sum(len(s.tokens) for s in steps) / q.passes


def letters_target(backend: str = "hf", tmp_path=None):
    """The 8-token model with Letters for text, on the Hugging Face forward, the lean one, or llama.cpp."""
    if backend != "llama.cpp":
        target = small_target(forward=backend)
        target.tokenizer = Letters()
        return target
    require("llama_cpp")
    import stand.backends.llamacpp as llamacpp

    with pytest.MonkeyPatch.context() as mp:  # one thread: on a shared 2-core machine two threads spin-wait
        mp.setattr(llamacpp, "threads", lambda: 1)
        return llamacpp.LlamaCppModel(small_gguf(str(tmp_path / "small.gguf")), Letters())


# every drafter; drafts often wrong; and the other backends (llama.cpp holds 256 sequences a pass: 50 rows a round)
EXACT = ([("hf", m, None) for m in names()] + [("hf", "stand", skewed)]
         + [(b, "stand", w) for b in ("lean", "llama.cpp") for w in (None, skewed)])


@pytest.mark.parametrize("backend,method,wrap", EXACT, ids=[f"{b}-{m}" + ("-skewed" if w else "") for b, m, w in EXACT])
def test_every_step_follows_the_model_under_every_drafter(backend, method, wrap, tmp_path):
    require_method(method)
    target, params = letters_target(backend, tmp_path), SamplingParams(
        TRUNCATED.temperature, TRUNCATED.top_p, TRUNCATED.top_k, max_new_tokens=100, seed=11)
    drafter = make_drafter(SpecConfig(method), target.vocab_size, target)
    rounds, children = (40, 50) if backend == "llama.cpp" else (8, 250)
    steps, per_pass = search_steps(target, wrap(drafter) if wrap else drafter, params, rounds, children)
    assert all(s.end in ("delimiter", "eos", "step_tokens") for s in steps)
    probs = exact_steps(params)
    keys = sorted(probs)
    index = {k: i for i, k in enumerate(keys)}
    assert all(tuple(s.tokens) in index for s in steps), "a step the model cannot give"
    p = pvalue(np.array([index[tuple(s.tokens)] for s in steps]), np.array([probs[k] for k in keys]))
    assert p > 1e-4, (method, p)
    if method != "none":
        assert per_pass > 1.02, per_pass  # drafts were accepted: verification was exercised


# ---- the benchmark -----------------------------------------------------------------------------------------------

def test_search_bench_rows_and_ratios(tiny):
    from stand.lab.search_bench import STRATEGIES, SearchBenchConfig, bench_search, records, summary, table
    from stand.tts.problems import Problem

    cfg = SearchBenchConfig(["none", "stand"], list(STRATEGIES), 4, SamplingParams(0.8, max_new_tokens=16, seed=0),
                            SpecConfig(cost_grid="off"), SearchConfig(2, "a", 6, 4)).validate()
    problems = [Problem("p0", "abcabc 12 12", answer="1"), Problem("p1", "hello hello", answer="2")]
    results = bench_search(tiny, problems, cfg)
    rows = {(r["strategy"], r["method"]): r for r in summary(records(results))}
    assert set(rows) == {(s, m) for s in STRATEGIES for m in ("none", "stand")}
    assert all(r["problems"] == 2 for r in rows.values())
    for m in ("none", "stand"):  # best-of-N answers from the self-consistency samples
        assert [s.new_tokens for s in results[("best-of-n", m)]] == [s.new_tokens for s in results[("self-consistency", m)]]
        assert rows[("single", m)]["A_vs_single"] == 1.0 and rows[("dvts", "none")]["time_vs_none"] == 1.0
    assert rows[("dvts", "none")]["A"] == 1.0 and rows[("beam", "stand")]["A"] > 1.0
    assert "dvts" in table(summary(records(results))).splitlines()[-1]
    assert rows[("single", "none")]["correct"] == sum(bool(s.correct) for s in results[("single", "none")])


def test_search_bench_runs_merge_into_one_summary(tmp_path):
    """Two runs over different problems read as one: counts, tokens and seconds add up; the same problem twice, or
    another configuration, is refused with a message."""
    import json

    from stand.lab.search_bench import main, merge

    def run(ids, correct, seconds):
        recs = [{"strategy": "dvts", "method": m, "id": i, "answer": "1", "correct": c, "judged": True,
                 "tokens": 100, "seconds": sec, "passes": p, "rounds": 3}
                for i, c in zip(ids, correct) for m, sec, p in (("none", seconds, 100), ("stand", seconds / 2, 50))]
        return {"config": {"n": 8}, "machine": {}, "summary": [], "problems": recs}

    a, b, c = (str(tmp_path / f) for f in ("a.json", "b.json", "c.json"))
    json.dump(run(["p0", "p1"], [True, False], 2.0), open(a, "w"))
    json.dump(run(["p2"], [True], 4.0), open(b, "w"))
    rows = {r["method"]: r for r in merge([a, b])["summary"]}
    assert rows["none"]["problems"] == 3 and rows["none"]["correct"] == 2
    assert rows["stand"]["seconds"] == 4.0 and rows["stand"]["time_vs_none"] == 0.5 and rows["stand"]["A"] == 2.0
    with pytest.raises(StandError, match="share a problem"):
        merge([a, a])
    other = run(["p3"], [True], 1.0)
    other["config"] = {"n": 4}
    json.dump(other, open(c, "w"))
    with pytest.raises(StandError, match="another configuration"):
        merge([a, c])
    with pytest.raises(SystemExit, match="another configuration"):
        main([a, c])
