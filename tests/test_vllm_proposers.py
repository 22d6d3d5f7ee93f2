"""stand's vLLM proposers without vLLM: the custom_class calls vLLM makes (a fake config, a token array as vLLM's
input batch keeps it), rows followed by content as vLLM moves them, groups by prompt, the chains drafted, the
options from the environment, and the CPU expand kernel's replacement. tests/test_vllm.py runs them inside vLLM."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stand.errors import StandError
from stand.integrations.vllm.chains import ChanceBins, StepCost, select
from stand.integrations.vllm.consensus_proposer import ConsensusProposer
from stand.integrations.vllm.cpu_fix import expand_on_cpu
from stand.integrations.vllm.rows import RowTracker
from stand.integrations.vllm.stand_proposer import StandProposer, best_chain
from stand.drafters.ngram_table import NGramTable, tails_of

MAX_LEN, V = 64, 100


def vllm_config(k: int = 4):
    spec = SimpleNamespace(num_speculative_tokens=k)
    model = SimpleNamespace(max_model_len=MAX_LEN, get_vocab_size=lambda: V, model="/nowhere")
    return SimpleNamespace(speculative_config=spec, model_config=model)


class Batch:
    """vLLM's view of the batch: token_ids_cpu [rows, MAX_LEN] and num_tokens_no_spec [rows]."""

    def __init__(self, rows: int = 8):
        self.tokens = np.zeros((rows, MAX_LEN), dtype=np.int32)
        self.lengths = np.zeros(rows, dtype=np.int32)

    def put(self, i: int, seq: list[int]) -> None:
        self.tokens[i, : len(seq)] = seq
        self.lengths[i] = len(seq)

    def step(self, proposer, sampled: list[list[int]]) -> list[list[int]]:
        return proposer.propose(sampled, self.lengths, self.tokens)


def test_rows_are_followed_when_vllm_moves_them():
    tracker, batch = RowTracker(forget_after=1), Batch()
    batch.put(0, [1, 2, 3, 9])  # two rows of one prompt and one of another, each after its first token
    batch.put(1, [1, 2, 3, 8])
    batch.put(2, [5, 5, 7])
    steps, _ = tracker.step([[9], [8], [7]], batch.lengths, batch.tokens)
    a, b, c = (s.row for s in steps)
    assert [s.fresh for s in steps] == [True] * 3 and a.prompt == [1, 2, 3] and c.prompt == [5, 5]
    assert a.group == b.group != c.group
    for s in steps:
        tracker.commit(s.row, s.new)
    batch.put(0, [5, 5, 7, 6])  # row 0 finished; vLLM moved row 2 into its place
    batch.put(1, [1, 2, 3, 8, 4, 4])
    steps, gone = tracker.step([[6], [4, 4]], batch.lengths, batch.tokens)
    assert (steps[0].row, steps[0].new, steps[1].row, steps[1].new) == (c, [6], b, [4, 4]) and not gone
    for s in steps:
        tracker.commit(s.row, s.new)
    _, gone = tracker.step([[], []], batch.lengths, batch.tokens)
    assert gone == [a]  # absent for more than forget_after steps


def test_stand_proposer_drafts_from_the_groups_text(monkeypatch):
    monkeypatch.setenv("STAND_VLLM_OPTIONS", '{"min_prob": 0.0}')  # whole chains: nothing cut by value or cost
    proposer, batch = StandProposer(vllm_config(k=4)), Batch()
    prompt = [10, 11, 12, 13, 14, 15]
    batch.put(0, prompt + [10])
    batch.put(1, [20, 21, 22, 23])
    drafts = batch.step(proposer, [[10], [23]])
    assert drafts[0] == [11, 12, 13, 14]  # the prompt's own continuation of 10
    assert drafts[1] == []  # no context seen before
    batch.put(2, prompt + [10, 11])  # a second sample of the first prompt, in the first one's table
    drafts = batch.step(proposer, [[], [], [10, 11]])
    assert drafts[2] == [12, 13, 14, 15] and drafts[0] == []
    assert proposer.stats.drafted == 8 and proposer.stats.calls == 2


def peaked(model, *tokens) -> None:
    """One step's logits through the model's logits layer: one position per token, peaked on it."""
    x = torch.full((len(tokens), V), -10.0)
    x[range(len(tokens)), list(tokens)] = 10.0
    model.logits_processor(x)


@pytest.mark.parametrize("positions_match", [True, False])
def test_stand_learns_the_targets_distributions(monkeypatch, positions_match):
    """Where the step's logits match its rows, the table learns the target's distribution (here peaked on 9 while
    the row committed 7, as sampling may); where they do not, the committed token, one-hot."""
    monkeypatch.setenv("STAND_VLLM_OPTIONS", '{"min_prob": 0.0, "target_dists": true, "max_n": 4}')
    proposer, batch = StandProposer(vllm_config(k=3)), Batch()
    model = torch.nn.Module()
    model.logits_processor = torch.nn.Identity()
    proposer.load_model(model)
    batch.put(0, [1, 2, 3, 4])
    peaked(model, 4)  # the prefill's position: after [1, 2, 3]
    assert batch.step(proposer, [[4]]) == [[]]  # nothing follows 4 yet
    batch.put(0, [1, 2, 3, 4, 7])
    peaked(model, *([9] if positions_match else [9, 9]))  # after [..., 4]: one position (no draft was given)
    batch.step(proposer, [[7]])
    row = next(iter(proposer.tracker.live.values())).row
    table = proposer.drafter.table_for(row)
    ids, p = table.dist(table.longest(tails_of([1, 2, 3, 4], 4)[-1])[0])
    assert ids[np.argmax(p)] == (9 if positions_match else 7)


def test_stand_chain_stops_where_the_table_is_unsure():
    table = NGramTable(2, 4, 64)
    table.insert(tails_of([1, 2], 2), np.array([[2, 3], [5, 6]]), np.array([[0.6, 0.4], [0.3, 0.2]]))
    tail = tuple(tails_of([1], 2)[-1].tolist())
    # estimates: 0.6 of a context seen once, discounted by 1/2; then 0.3/0.5 after (1, 2), discounted; then no entry
    tokens, estimates = best_chain(table, tail, 5)
    assert tokens == [2, 5] and np.allclose(estimates, [0.3, 0.3])
    assert best_chain(table, tail, 5, floor=0.1)[0] == [2]  # 0.3 * 0.3 < 0.1
    assert best_chain(table, tail, 1)[0] == [2]


def test_chains_never_pass_the_context_limit(monkeypatch):
    monkeypatch.setenv("STAND_VLLM_OPTIONS", '{"min_prob": 0.0}')
    proposer, batch = StandProposer(vllm_config(k=8)), Batch()
    seq = [1, 2, 3, 4] * 15 + [1, 2, 3]  # 63 tokens of a repeating text: room for the bonus token only
    batch.put(0, seq)
    assert batch.step(proposer, [[3]]) == [[]]
    batch.put(1, seq[:58])  # a step commits the chain and a bonus token: 58 + 5 + 1 = 64
    assert batch.step(proposer, [[], [2]])[1] == [3, 4, 1, 2, 3]


def test_consensus_proposer_drafts_what_another_sample_wrote(monkeypatch):
    monkeypatch.setenv("STAND_VLLM_OPTIONS", '{"k": 2, "min_prob": 0.0}')
    proposer, batch = ConsensusProposer(vllm_config(k=4)), Batch()
    batch.put(0, [7, 8, 9, 30, 31, 32, 33, 34])
    batch.put(1, [7, 8, 9, 30])
    batch.step(proposer, [[30, 31, 32, 33, 34], [30]])
    batch.put(1, [7, 8, 9, 30, 31])
    assert batch.step(proposer, [[], [31]])[1] == [32, 33, 34]


def test_calibration_learns_what_vllm_accepted():
    cal = ChanceBins()
    assert 0.5 < cal.chances([0.55])[0] < 0.6  # the prior: the bin's centre
    for _ in range(50):
        cal.update([0.95, 0.95, 0.95], accepted=1)  # the first token always accepted, the second never
    assert cal.chances([0.95])[0] == pytest.approx(0.5, abs=0.02)  # 50 hits in 100 trials (third never reached)


def test_step_cost_and_selection():
    cost = StepCost()  # 10 ms a step, 2 ms a row, 1 ms a draft token
    for rows, drafts in [(8, 0), (8, 0), (8, 8), (8, 16), (4, 0), (4, 4), (4, 12), (2, 2)]:
        cost.add(rows, drafts, (10 + 2 * rows + drafts) / 1000)
    a, c, b = cost.fit()
    assert (a, c, b) == pytest.approx((0.010, 0.002, 0.001), rel=1e-6)
    assert cost.per_step(8) == pytest.approx((0.026, 0.001))
    values = [np.array([0.9, 0.8, 0.3]), np.array([0.6, 0.05])]
    assert select(values, None, 0.1) == [3, 1]  # no cost: the floor
    assert select(values, (0.026, 0.001), 0.0) == [3, 1]  # cheap tokens: all worth more than b E / cost
    assert select(values, (0.020, 0.005), 0.0) == [2, 0]  # dearer: after two, 0.6 < b E / cost = 0.0185 / 0.030
    assert select(values, (0.020, 0.008), 0.0) == [1, 0]  # dear tokens: only the surest
    assert select(values, None, 0.95) == [0, 0]


@pytest.mark.parametrize("text,message", [("{", "is not JSON"), ("[1]", "must be a JSON object"),
                                          ('{"colour": 1}', "has no option 'colour'"),
                                          ('{"min_prob": 2.0}', "min_prob must be in [0, 1]")])
def test_bad_options_are_one_line(monkeypatch, text, message):
    monkeypatch.setenv("STAND_VLLM_OPTIONS", text)
    with pytest.raises(StandError, match=message.replace("[", r"\[").replace("]", r"\]")):
        StandProposer(vllm_config())


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_on_cpu_writes_every_dtype_in_place(dtype):
    """The kernel vLLM's CPU build gets wrong (issue 55005): [a, b, c] over 2, 0 and 3 positions, 0 replaced by 9."""
    out = torch.full((5,), -1, dtype=dtype)
    expand_on_cpu(out, torch.tensor([4, 0, 0], dtype=dtype), torch.tensor([2, 2, 5], dtype=torch.int32), 0, 9)
    assert out.tolist() == [4, 4, 9, 9, 9]
    temps = torch.empty(3)
    expand_on_cpu(temps, torch.tensor([0.6, 0.0]), torch.tensor([2, 3]), 0, 1)
    assert torch.allclose(temps, torch.tensor([0.6, 0.6, 1.0]))
