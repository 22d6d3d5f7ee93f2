"""Every method stand knows, in one table: our engine's drafters, and the rows of other engines that the bench runs
beside them on the same model. The CLI, the server, the vLLM launcher and the bench derive their lists and checks from
here; drafters/registry.py imports the drafter classes it names."""

from __future__ import annotations

from dataclasses import dataclass

from stand.errors import StandError

ENGINES = ("stand", "hf", "llama.cpp", "vllm")


@dataclass(frozen=True)
class Method:
    name: str
    engine: str  # "stand": our engine; "hf", "llama.cpp", "vllm": that engine's own loop (bench anchors)
    target: str | None  # stand: "module:Class" under stand.drafters; vllm: the speculative kind (None: plain)
    summary: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("none", "stand", "none:NoDrafter", "plain autoregressive decoding in our engine"),
    Method("pld", "stand", "pld:PromptLookup", "prompt lookup: the continuation of the latest context match"),
    Method("stand", "stand", "stand:StandDrafter", "STAND: logit n-gram table, Gumbel-Top-K over a calibrated tree"),
    Method("stand-heuristic", "stand", "stand:HeuristicStandDrafter", "STAND over the hand-made tree (ablation)"),
    Method("stand-dynamic", "stand", "stand:DynamicStandDrafter", "STAND with best-first trees sized per pass"),
    Method("recycle", "stand", "recycle:TokenRecycling", "Token Recycling: top-k adjacency, static tree"),
    Method("consensus", "stand", "consensus:ConsensusDrafter", "the N samples draft for each other (a DAG)"),
    Method("ngrammys", "stand", "ngrammys:NGrammys", "N-Grammys: bigrams from the weights plus context n-grams"),
    Method("stand+consensus", "stand", "combined:StandConsensus", "the STAND tree with the consensus chain grafted"),
    Method("suffix", "stand", "suffix:SuffixDrafter", "SuffixDecoding on arctic-inference's suffix trees"),
    Method("hf", "hf", None, "transformers' generate"),
    Method("hf-pld", "hf", "pld", "transformers' generate with its prompt lookup"),
    Method("hf-batched", "hf", "batched", "transformers' generate, the n samples as one batch"),
    Method("llama.cpp", "llama.cpp", None, "llama-cpp-python's own generate loop"),
    Method("llama.cpp-pld", "llama.cpp", "pld", "llama-cpp-python's generate with its prompt-lookup draft"),
    Method("vllm", "vllm", None, "vLLM, plain decoding"),
    Method("vllm-ngram", "vllm", "ngram", "vLLM's n-gram proposer"),
    Method("vllm-suffix", "vllm", "suffix", "vLLM's SuffixDecoding proposer"),
    Method("vllm-stand", "vllm", "stand", "stand's STAND proposer inside vLLM"),
    Method("vllm-consensus", "vllm", "consensus", "stand's consensus proposer inside vLLM"),
    Method("vllm-ngrammys", "vllm", "ngrammys", "stand's N-Grammys proposer inside vLLM"),
)}


def names(engine: str | None = "stand") -> tuple[str, ...]:
    """The methods of one engine (None: every method), in the table's order."""
    return tuple(n for n, m in METHODS.items() if engine is None or m.engine == engine)


def check_method(name: str, engine: str | None = "stand") -> str:
    """name, if it is a method of `engine` (None: of any engine); else a StandError listing the choices."""
    if name not in names(engine):
        what = "method" if engine in (None, "stand") else f"{engine} method"
        raise StandError(f"unknown {what} {name!r}; choose from {', '.join(names(engine))}")
    return name


def engine_of(name: str) -> str:
    return METHODS[check_method(name, None)].engine
