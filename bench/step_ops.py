"""Where a training step's time goes, op by op, without the torch profiler: the wall time of every aten op (forward
and backward) over a range of training steps of a real `run-ft`, summed per op and divided by the step count.

    python bench/step_ops.py [--steps 10:20] [--top 40] [--shapes] -- run-ft --ft=JOB.yaml

--shapes splits every op by the shapes of its tensor arguments, and prints the matrix products' (mm, addmm, bmm)
GFLOP/s, to compare with bench/matmul_ceiling.py's isolated rates and to see what the small LoRA products cost. A
dimension that is no parameter's size (nor 1) is printed as T: token counts change every step, and one product of
the model should be one line.

Why not the profiler: on the SFT peer bench it put 2-3x the time on the LM head's ops and on the first matrix
products of a step, from page faults it caused itself (bench/README, #12, sessions 10 and 14). A TorchDispatchMode
sees the same aten calls and costs only a clock read per op (~10 us; the printed wall time per step includes it).
Give the job enough steps (max_steps) to reach the end of --steps.

--cuda: on a GPU, where ops return before their kernels run, the torch profiler instead (CPU and CUDA activities):
each op's own kernel time a step, and the kernels' total against the step's wall time (the rest is the GPU
waiting for the host).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="10:20", help="first:last training step timed (last excluded)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--shapes", action="store_true",
                        help="every op by its arguments' shapes; matrix products with GFLOP/s")
    parser.add_argument("--cuda", action="store_true", help="kernel times from the torch profiler (GPU runs)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the llmfinetune command line")
    args = parser.parse_args()
    first, last = (int(part) for part in args.steps.split(":"))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    import torch
    import transformers
    from torch.utils._python_dispatch import TorchDispatchMode

    seconds, calls = collections.defaultdict(float), collections.Counter()
    flops = collections.Counter()
    products = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1)}  # which operands are multiplied

    class OpTimer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, op_args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*op_args, **(kwargs or {}))
            elapsed = time.perf_counter() - start  # before the naming below, which is not the op's time
            op = name = func.overloadpacket.__name__
            if args.shapes:
                shapes = [arg.shape for arg in op_args if isinstance(arg, torch.Tensor)]
                name = f"{op} " + ", ".join(
                    "x".join(str(d) if d in state["model_dims"] else "T" for d in shape) for shape in shapes)
                if op in products:
                    left, right = (op_args[i].shape for i in products[op])
                    flops[name] += 2 * left.numel() * right[-1]
            seconds[name] += elapsed
            calls[name] += 1
            return out

    state = {"step": 0, "start": None, "model_dims": set()}
    training_step = transformers.Trainer.training_step

    def profiled_step(self, *step_args, **step_kwargs):
        state["step"] += 1
        if state["step"] == first:
            torch.cuda.synchronize()
            state["start"] = time.perf_counter()
            state["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                   torch.profiler.ProfilerActivity.CUDA])
            state["profiler"].__enter__()
        if state["step"] == last:
            torch.cuda.synchronize()
            wall = time.perf_counter() - state["start"]
            state["profiler"].__exit__(None, None, None)
            report_kernels(state["profiler"], wall, last - first)
        with torch.profiler.record_function("## training_step (forward, loss, backward) ##"):
            return training_step(self, *step_args, **step_kwargs)

    def report_kernels(profiler, wall: float, steps: int) -> None:
        def kernel_us(event):
            return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)

        kernels = sum(event.device_time for event in profiler.events()
                      if str(getattr(event, "device_type", "")).endswith("CUDA"))
        print(f"steps {first}-{last - 1}: {wall / steps * 1e3:.1f} ms a step (optimizer and data included, "
              f"profiler on), {kernels / steps / 1e3:.1f} ms of it in CUDA kernels; torch {torch.__version__}",
              flush=True)
        ops = sorted(profiler.key_averages(), key=lambda event: -kernel_us(event))
        for event in ops[:args.top]:
            print(f"{kernel_us(event) / steps / 1e3:9.2f} ms/step {event.count // steps:6d} calls  {event.key[:110]}",
                  flush=True)
        try:
            report_gaps(profiler.events(), steps)
        except Exception as error:  # the kernel table above still stands
            print(f"GPU idle report failed: {type(error).__name__}: {error}", flush=True)

    def report_gaps(events, steps: int) -> None:
        """The GPU's idle time between kernels, each gap put on the innermost CPU op (or record_function range)
        running at its middle: what the host was doing while the GPU waited."""
        import bisect

        busy = sorted((e.time_range.start, e.time_range.end) for e in events
                      if str(getattr(e, "device_type", "")).endswith("CUDA"))
        host = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                      if str(getattr(e, "device_type", "")).endswith("CPU"))
        starts = [start for start, _, _ in host]
        idle, gaps, reach = collections.Counter(), collections.Counter(), busy[0][1] if busy else 0
        for start, end in busy[1:]:
            if start - reach >= 5:  # microseconds
                middle = (start + reach) / 2
                where = "(no op: Python)"
                for i in range(bisect.bisect_right(starts, middle) - 1, max(-1, bisect.bisect_right(starts, middle)
                                                                          - 3000), -1):
                    if host[i][1] >= middle:
                        where = host[i][2]
                        break
                idle[where] += start - reach
                gaps[where] += 1
            reach = max(reach, end)
        total = sum(idle.values())
        print(f"GPU idle between kernels: {total / steps / 1e3:.1f} ms a step, by the host's innermost op at the "
              f"gap's middle:", flush=True)
        for where, microseconds in idle.most_common(args.top):
            print(f"{microseconds / steps / 1e3:9.2f} ms/step {gaps[where] // steps:6d} gaps   {where[:100]}",
                  flush=True)

    def timed_step(self, *step_args, **step_kwargs):
        state["step"] += 1
        if state["step"] == first:
            state["start"] = time.perf_counter()
            state["model_dims"] = {1} | {size for parameter in self.model.parameters() for size in parameter.shape}
        if state["step"] == last:
            report(time.perf_counter() - state["start"], last - first)
        if first <= state["step"] < last:
            with OpTimer():
                return training_step(self, *step_args, **step_kwargs)
        return training_step(self, *step_args, **step_kwargs)

    def report(wall: float, steps: int) -> None:
        print(f"steps {first}-{last - 1}: {wall / steps * 1e3:.1f} ms a step (optimizer and data included), "
              f"{sum(seconds.values()) / steps * 1e3:.1f} ms of it in aten ops; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads", flush=True)
        for name, total in sorted(seconds.items(), key=lambda item: -item[1])[:args.top]:
            rate = f"  {flops[name] / total / 1e9:.0f} GFLOP/s" if flops[name] else ""
            print(f"{total / steps * 1e3:9.2f} ms/step {calls[name] // steps:6d} calls  {name}{rate}", flush=True)

    transformers.Trainer.training_step = profiled_step if args.cuda else timed_step
    from llmfinetune.cli import main as llmfinetune_main

    sys.exit(llmfinetune_main(command))


if __name__ == "__main__":
    main()
