"""Small pure functions run compiled (torch.compile: one graph each, dynamic shapes, compiled once per process) on
devices where eager ops make a pass over memory each and launch a kernel each: on a GPU the causal-LM loss
(lm_head.py) and the RMSNorm, SwiGLU and rotary embedding of Llama-style models (kernels.py). A function whose
compilation fails (a GPU without a working Triton, say) warns once and is not tried again: its caller runs its
uncompiled path, the same numbers, slower. The CPU tests compile the same functions with inductor's CPU backend."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

NOT_COMPILED = object()  # what `call` returns where the function's compiled form could not be built
_compiled: dict = {}
_failed: set = set()


def call(function, *args):
    """`function(*args)` through its compiled form, or NOT_COMPILED where that form failed to build (now or
    before)."""
    if function in _failed:
        return NOT_COMPILED
    if function not in _compiled:
        import torch

        _compiled[function] = torch.compile(function, dynamic=True, fullgraph=True)
    try:
        return _compiled[function](*args)
    except Exception as error:  # noqa: BLE001 - any compiler failure: the caller's uncompiled path computes the same
        logger.warning("%s could not be compiled (%s: %s); it runs uncompiled, slower.", function.__qualname__,
                       type(error).__name__, (str(error).splitlines() or [""])[0])
        _failed.add(function)
        return NOT_COMPILED


def run(function, *args):
    """`function(*args)`, compiled where that could be built, else as it is."""
    result = call(function, *args)
    return function(*args) if result is NOT_COMPILED else result
