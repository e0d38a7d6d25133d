"""The fastest an SFT step of issue #12's bench model could be on this CPU: every matrix product of a LoRA q/v step,
timed alone at its best, weighted by its share of the step's FLOPs.

    python bench/matmul_ceiling.py [--model /tmp/llmfinetune-peer-bench/model] [--tokens 1890] [--learned 1400]

The model is the one `bench/peer_llamafactory.py` builds (its config.json is read for the shapes, so the two
benches cannot drift apart). The products: the forward (y = x W^T) and the input gradient (dX = dY W) of every
frozen linear layer, and the LM head at learned positions only; the LoRA adapters' own small products are left out.
--tokens is the step's tokens (8 packed rows of 256 hold ~1890), --learned its learned positions. Best of 5 x 5
repeats, so the printed tokens/s is what these kernels allow with nothing else in the step: passing it needs fewer
FLOPs or faster kernels. It runs in its own invocation: compare it with `bench/peer_llamafactory.py`'s tokens/s
measured on the same machine, and say they are two invocations.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


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
    parser.add_argument("--model", type=Path, default=Path("/tmp/llmfinetune-peer-bench/model"))
    parser.add_argument("--tokens", type=int, default=1890)
    parser.add_argument("--learned", type=int, default=1400)
    args = parser.parse_args()
    config_file = args.model / "config.json"
    if not config_file.is_file():
        sys.exit(f"{config_file} not found: run `python bench/peer_llamafactory.py` once (it builds the model), "
                 "or pass --model DIR")
    config = json.loads(config_file.read_text())
    hidden, intermediate, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config.get("head_dim", hidden // config["num_attention_heads"])
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    # (in, out) of q, k, v, o, gate, up, down; each appears once per layer, forward and input gradient.
    layer = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, intermediate),
             (hidden, intermediate), (intermediate, hidden)]
    products = [(args.tokens, inputs, outputs, config["num_hidden_layers"]) for inputs, outputs in layer]
    products.append((args.learned, hidden, vocab, 1))
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
