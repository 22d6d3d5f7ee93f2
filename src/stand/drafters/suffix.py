"""SuffixDecoding (arXiv 2411.04975) as a stand drafter, on arctic-inference's suffix trees, verified by our verifier.

arctic-inference keeps, per request, a suffix tree of its prompt and, shared by every request of a cache, one over
all their responses so far; a draft matches the end of the context (up to max_depth tokens) in both and grows a
tree best-first from the match, each node scored by its estimated probability (the product along its path of
child count / parent count), keeping nodes of at least min_token_prob. Here a cache serves one group (the N samples
of a question, or every row with share_across_prompts), so the samples draft from each other's text as it is
written, and every row of a group is a request in it.

The draft is a deterministic function of the text so far (counts, not draws), so every node is verified with
one-hot q (q=None), siblings in the order the tree gives them (most probable first). The probability estimates
size the tree: nodes the engine's pass cannot afford (estimate below its min_value) are left out, and at most
max_nodes (the pass's share) or the option nodes are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stand.core.drafter import Drafter
from stand.core.tree import DraftTree
from stand.errors import StandError


@dataclass
class SuffixOptions:
    nodes: int = 24  # most draft nodes per step
    max_depth: int = 24  # suffix-tree depth: the longest context matched and the deepest draft
    max_spec_factor: float = 1.0  # a draft has at most max_spec_factor * match length + max_spec_offset tokens
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1  # nodes whose estimated probability is lower are not drafted
    tree: bool = True  # tree speculation; False: the single most probable path
    max_cached_requests: int = 256  # responses (rows) a cache keeps, oldest evicted first: bounds a shared cache

    def __post_init__(self):
        if self.nodes < 1 or self.max_depth < 1 or self.max_cached_requests < 1:
            raise StandError(f"nodes, max_depth and max_cached_requests must be >= 1, got {self.nodes}, "
                             f"{self.max_depth} and {self.max_cached_requests}")


def suffix_cache_class():
    """arctic-inference's SuffixDecodingCache; StandError naming the install when it is missing."""
    try:
        from arctic_inference.suffix_decoding import SuffixDecodingCache
    except ImportError as e:
        raise StandError("method 'suffix' needs arctic-inference: run `bash scripts/setup.sh` or "
                         "`pip install arctic-inference`") from e
    return SuffixDecodingCache


def as_tree(token_ids, parents, probs, min_prob: float, limit: int) -> DraftTree:
    """arctic's draft (parents index earlier tokens, -1 the root; probabilities never above the parent's) as a
    DraftTree of its first nodes with probability >= min_prob, at most limit; every node one-hot."""
    tree, where = DraftTree(), {}
    for i, (tok, parent, p) in enumerate(zip(token_ids, parents, probs)):
        if len(tree) >= limit:
            break
        if p < min_prob or (parent >= 0 and parent not in where):
            continue
        where[i] = tree.add(int(tok), -1 if parent < 0 else where[parent])
    return tree


class SuffixDrafter(Drafter):
    name = "suffix"
    Options = SuffixOptions

    def __init__(self, config, vocab_size: int):
        super().__init__(config, vocab_size)
        self.cache_class = suffix_cache_class()
        self.caches: dict[object, object] = {}  # group key -> SuffixDecodingCache
        self.keys: dict[int, object] = {}  # row uid -> its group key

    def _key(self, row) -> object:
        return "shared" if self.config.share_across_prompts else row.group_key()

    def start(self, row, prompt=None) -> None:
        key = self._key(row)
        if key not in self.caches:
            self.caches[key] = self.cache_class(max_tree_depth=self.options.max_depth,
                                                max_cached_requests=self.options.max_cached_requests)
        self.keys[row.uid] = key
        cache = self.caches[key]
        cache.start_request(row.uid, np.asarray(row.prompt, dtype=np.int32))
        if len(row.tokens) > row.prompt_len:
            cache.add_active_response(row.uid, np.asarray(row.generated, dtype=np.int32))

    def propose(self, row, max_nodes: int | None = None, min_value: float = 0.0) -> DraftTree:
        if row.uid not in self.keys:
            self.start(row)
        o = self.options
        limit = self.size(max_nodes, o.nodes)
        if limit < 1:
            return DraftTree()
        context = np.asarray(row.tokens[-o.max_depth:], dtype=np.int32)
        draft = self.caches[self.keys[row.uid]].speculate(
            row.uid, context, max_spec_tokens=limit, max_spec_factor=o.max_spec_factor,
            max_spec_offset=o.max_spec_offset, min_token_prob=o.min_token_prob, use_tree_spec=o.tree)
        return as_tree(draft.token_ids, draft.parents, draft.probs, min_value, limit)

    def observe(self, row, tree, probs, verdict) -> None:
        if row.uid in self.keys:
            new = np.asarray(verdict.tokens(tree), dtype=np.int32)
            self.caches[self.keys[row.uid]].add_active_response(row.uid, new)

    def finish(self, row) -> None:
        key = self.keys.pop(row.uid, None)
        if key is None:
            return
        self.caches[key].stop_request(row.uid)
        if key != "shared" and key not in self.keys.values():
            del self.caches[key]
