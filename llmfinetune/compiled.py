"""Small pure functions run compiled (torch.compile: one graph each, dynamic shapes, compiled once per process) on
devices where eager ops make a pass over memory each and launch a kernel each: on a GPU the causal-LM loss
(lm_head.py) and the RMSNorm, SwiGLU and rotary embedding of Llama-style models (kernels.py). A function whose
compilation fails (a GPU without a working Triton, say) warns once and is not tried again: its caller runs its
uncompiled path, the same numbers, slower. Running out of memory is not a compilation failure: it is raised. The
CPU tests compile the same functions with inductor's CPU backend."""
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

        _compiled[function] = torch.compile(function, backend=_backward_built_with_forward, dynamic=True,
                                            fullgraph=True)
    try:
        return _compiled[function](*args)
    except Exception as error:  # noqa: BLE001 - any compiler failure: the caller's uncompiled path computes the same
        from .errors import root_cause
        from .faults import out_of_memory

        cause = root_cause(error)
        if out_of_memory(error) or out_of_memory(cause):  # the uncompiled path needs more memory, not less
            raise
        logger.warning("%s could not be compiled (%s: %s); it runs uncompiled, slower.", function.__qualname__,
                       type(cause).__name__, (str(cause).splitlines() or [""])[0])
        _failed.add(function)
        return NOT_COMPILED


def _inductor(graph, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph, example_inputs)


def _backward_built_with_forward(graph, example_inputs):
    """Inductor, with the backward compiled when the forward is rather than at the first backward (AOTAutograd's
    lazy default): a backward that cannot be built then fails inside `call`'s try, where the uncompiled path takes
    over, not in the middle of loss.backward() as a traceback. Applied here, once per compilation, not per call."""
    import contextlib

    import torch._functorch.config as aot_config

    eager = (aot_config.patch(force_non_lazy_backward_lowering=True)
             if hasattr(aot_config, "force_non_lazy_backward_lowering") else contextlib.nullcontext())
    with eager:
        return _inductor(graph, example_inputs)


def run(function, *args):
    """`function(*args)`, compiled where that could be built, else as it is."""
    result = call(function, *args)
    return function(*args) if result is NOT_COMPILED else result
