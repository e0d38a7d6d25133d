"""The fastest an SFT step of issue #12's bench model could be on this CPU: every matrix product of a LoRA q/v step,
timed alone at its best, weighted by its share of the step's FLOPs.

    python bench/matmul_ceiling.py [--tokens 1890] [--learned 1400]

The products: the forward (y = x W^T) and the input gradient (dX = dY W) of every frozen linear layer of the
27M Qwen2-shaped model (hidden 512, 8 layers, 2 KV heads of 64, intermediate 1408), and the LM head (vocabulary
8000) at learned positions only. --tokens is the step's tokens (8 packed rows of 256 hold ~1890), --learned its
learned positions. Best of 5 x 5 repeats: an upper bound on the rate, so the printed tokens/s is a ceiling that
nothing but fewer FLOPs can pass. Compare it with `bench/peer_llamafactory.py`'s tokens/s on the same machine.
"""
from __future__ import annotations

import argparse
import time

HIDDEN, KV, INTERMEDIATE, LAYERS, VOCAB = 512, 128, 1408, 8, 8000


def best_seconds(run, repeats: int = 5, calls: int = 5) -> float:
    for _ in range(3):
        run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1890)
    parser.add_argument("--learned", type=int, default=1400)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    # (in, out) of q, k, v, o, gate, up, down; each appears once per layer, forward and input gradient.
    layer = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE),
             (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]
    products = [(args.tokens, inputs, outputs, LAYERS) for inputs, outputs in layer]
    products.append((args.learned, HIDDEN, VOCAB, 1))
    step_flop = step_seconds = 0.0
    for rows, inputs, outputs, count in products:
        x, weight, grad = torch.randn(rows, inputs), torch.randn(outputs, inputs), torch.randn(rows, outputs)
        for kind, run in (("forward", lambda: F.linear(x, weight)), ("input grad", lambda: grad @ weight)):
            seconds = best_seconds(run)
            flop = 2 * rows * inputs * outputs
            step_flop += flop * count
            step_seconds += seconds * count
            print(f"{kind:10s} {rows}x{inputs}x{outputs}: {flop / seconds / 1e9:6.1f} GFLOP/s", flush=True)
    print(f"{step_flop / 1e9:.1f} GFLOP a step at {step_flop / step_seconds / 1e9:.1f} GFLOP/s weighted: "
          f"{step_seconds:.3f} s a step, ceiling {args.tokens / step_seconds:.0f} tokens/s")


if __name__ == "__main__":
    main()
