"""A correct CPU stand-in for one of vLLM's sampler kernels (vLLM issue 55005), and the vLLM plugin that installs it.

The bug: where Triton has no CPU backend, vLLM's CPU platform replaces the rejection sampler's Triton kernels with
C++ ones. The stand-in for `expand_kernel` (which spreads each request's temperature, top-k and top-p over its
draft positions) converts its output tensor to int64 before the C++ call writes into it; for a float32 or int32
output that conversion is a copy, so the real output, allocated with `new_empty`, is never written. The rejection
sampler then divides the draft positions' logits by uninitialised memory: at temperature > 0 every speculative
method accepts garbage on CPU (greedy does not expand anything and is unaffected).

The fix is detected, not assumed from a version number: `expand_is_broken` runs vLLM's CPU stand-in once on a
float32 tensor and sees whether it wrote the output; only then is `expand_on_cpu` (plain torch, in place, every
dtype) registered through vLLM's own kernel-override registry (vllm.triton_utils.dispatcher). vLLM's platform
registers its stand-ins while a worker starts, after the general plugins load, so `plugin` (the entry point
`vllm.general_plugins: stand`) wraps that registration to install the fix right after it: the one place where
stand changes vLLM's code. It also sets NUMBA_THREADING_LAYER=workqueue: with numba's OpenMP layer, vLLM's n-gram
proposer sets the shared OpenMP pool to one thread and torch then runs on one core.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)
KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
SWITCH = "STAND_VLLM_CPU_FIX"  # "0" leaves vLLM's kernel alone (the tests show the bug that way)


def expand_on_cpu(output: torch.Tensor, input: torch.Tensor, cu_num_tokens: torch.Tensor, replace_from,
                  replace_to, MAX_NUM_TOKENS=None) -> None:
    """output [num_tokens] <- input [batch] repeated per request, request i covering positions
    cu_num_tokens[i-1]..cu_num_tokens[i]-1 (cumulative counts [batch]); values equal to replace_from become
    replace_to. Written in place, in output's dtype (the kernel's contract)."""
    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=torch.zeros(1, dtype=torch.int64))  # [batch]
    values = torch.where(input == replace_from, torch.as_tensor(replace_to, dtype=input.dtype), input)  # [batch]
    spread = torch.repeat_interleave(values, counts)  # [cu_num_tokens[-1]]
    output[: spread.numel()] = spread.to(output.dtype)


def expand_is_broken() -> bool:
    """Whether vLLM's registered CPU stand-in for expand_kernel leaves a float32 output unwritten."""
    from vllm.utils import cpu_triton_utils

    out = torch.full((3,), float("nan"))
    cpu_triton_utils._expand_kernel_impl(out, torch.tensor([0.5, 2.0]), torch.tensor([1, 3], dtype=torch.int32),
                                        0, 1)
    return not torch.equal(out, torch.tensor([0.5, 2.0, 2.0]))


def install() -> bool:
    """Registers expand_on_cpu where vLLM runs on CPU without Triton and its stand-in is broken; True if it did."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not current_platform.is_cpu() or HAS_TRITON or not expand_is_broken():
        return False
    if os.environ.get(SWITCH) == "0":
        log.warning("stand: %s=0: vLLM's broken CPU expand kernel is left in place (sampling at T > 0 is wrong)",
                    SWITCH)
        return False
    from vllm.triton_utils.dispatcher import register_kernels

    import vllm

    register_kernels({KERNEL: expand_on_cpu})
    log.warning("stand: vLLM %s's CPU expand kernel leaves its output unwritten (vLLM issue 55005): replaced by a "
                "torch implementation, so speculative decoding at temperature > 0 samples correctly", vllm.__version__)
    return True


def _after(register):
    """The platform's override registration, then install()."""

    @functools.wraps(register)
    def wrapped(*args, **kwargs):
        result = register(*args, **kwargs)
        install()
        return result

    wrapped.stand_fix = True
    return wrapped


def plugin() -> None:
    """vLLM general plugin (loaded by every vLLM process): the numba threading layer, and the CPU fix installed
    right after vLLM registers its CPU kernels."""
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    cls = type(current_platform)
    register = cls.__dict__.get("register_triton_kernel_overrides")
    if register is None or getattr(register.__func__, "stand_fix", False):
        return
    cls.register_triton_kernel_overrides = classmethod(_after(register.__func__))
