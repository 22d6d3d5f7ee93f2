"""What a seed reproduces (docs/design.md, "Exactness and what a seed reproduces"): the same seed, prompts, n,
method and options, model, backend, dtype, cost grid and batch composition give the same tokens; each row draws
from its own generator seeded by (seed, prompt index, sample index), so under plain decoding (one draw a token) a
row's sample does not depend on the rows beside it, while a drafting method's draws follow its trees, which the
rows beside it size."""

from __future__ import annotations

from stand.api import generate
from stand.params import SamplingParams, SpecConfig

PROMPTS = ["Tell me a story about a cat.", "Count to ten."]


def ids(out) -> list[list[list[int]]]:
    return [[s.token_ids for s in samples] for samples in out]


def test_seed_reproduces_same_method_backend_and_batch(tiny):
    spec = SpecConfig(method="stand", cost_grid="off")
    params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=5, ignore_eos=True)
    first = ids(generate(PROMPTS, tiny, params=params, spec=spec, n=3))
    assert ids(generate(PROMPTS, tiny, params=params, spec=spec, n=3)) == first
    other = SamplingParams(temperature=1.0, max_new_tokens=24, seed=6, ignore_eos=True)
    assert ids(generate(PROMPTS, tiny, params=other, spec=spec, n=3)) != first


def test_seed_rows_draw_on_their_own_under_plain_decoding(tiny):
    """Sample j of prompt i is the same alone, beside other prompts, or among more samples (method none)."""
    params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=5, ignore_eos=True)
    spec = SpecConfig(method="none", cost_grid="off")
    together = ids(generate(PROMPTS, tiny, params=params, spec=spec, n=3))
    alone = ids(generate(PROMPTS[:1], tiny, params=params, spec=spec, n=2))
    assert alone[0] == together[0][:2]
    assert len({tuple(s) for s in together[0]}) == 3  # the samples of a prompt differ
