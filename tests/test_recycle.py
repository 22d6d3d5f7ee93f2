import torch

from stand.core.drafter import PromptDists
from stand.drafters.recycle import TokenRecycling
from stand.core.sequence import Row
from stand.params import SamplingParams, SpecConfig
from stand.drafters.templates import DEFAULT_SIZE, TreeTemplate
from stand.core.tree import DraftTree
from stand.core.verify import Verdict


def _probs(rows: dict[int, list[int]], n: int, V: int = 50) -> torch.Tensor:
    """[n, V] distributions whose ranking puts rows[i] first, in order."""
    p = torch.full((n, V), 1e-4)
    for i, best in rows.items():
        for r, tok in enumerate(best):
            p[i, tok] = 1.0 - 0.1 * r
    return p / p.sum(-1, keepdim=True)


def _prompt(prompt: list[int], probs: torch.Tensor, k: int) -> PromptDists:
    """What the engine hands start(): the prompt's distributions, kept sparse."""
    dists = PromptDists.empty(len(probs), k)
    dists.fill(0, probs, prompt[1:])
    return dists


def _drafter(k=2):
    d = TokenRecycling(SpecConfig(method="recycle", options={"k": k}), 50)
    d.kids[DEFAULT_SIZE] = TreeTemplate.from_pairs([(-1, 0), (-1, 1), (0, 0), (0, 1), (2, 0)]).children()
    return d


def test_prompt_fills_rows_and_latest_overwrites():
    d = _drafter()
    row = Row([1, 2, 1, 3], SamplingParams())
    d.start(row, _prompt(row.prompt, _probs({0: [5, 6], 1: [7, 8], 2: [9, 10]}, 3), d.prompt_topk()))
    assert d.adj[1].tolist() == [9, 10] and d.adj[2].tolist() == [7, 8]  # token 1: its later position wins
    assert (d.adj[3] == -1).all()
    tree = DraftTree()
    tree.add(4)
    d.observe(row, tree, _probs({0: [11, 12], 1: [13, 14]}, 2), Verdict([], 0))  # root 3, then node 4
    assert d.adj[3].tolist() == [11, 12] and d.adj[4].tolist() == [13, 14]


def test_draft_expands_static_tree_one_hot():
    d = _drafter()
    d.adj[1] = [2, 3]
    d.adj[2] = [4, 5]
    d.adj[4] = [6, 7]
    tree = d.propose(Row([9, 1], SamplingParams()))
    assert tree.tokens == [2, 3, 4, 5, 6] and tree.parents == [-1, -1, 0, 0, 2]
    assert tree.qs == [None] * 5 and tree.tags == [0, 1, 2, 3, 4]


def test_unknown_token_drafts_nothing():
    d = _drafter()
    assert len(d.propose(Row([9, 1], SamplingParams()))) == 0
    assert d.memory_bytes() == 50 * 2 * 4
