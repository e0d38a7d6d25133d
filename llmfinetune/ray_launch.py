"""`llmfinetune ray-ft`: the same job on a local Ray cluster, one Ray Train worker per `scaling_config.num_workers`.

Ray Train's TorchTrainer starts the workers and sets up the torch process group (gloo on CPU, NCCL on GPU) with
RANK / WORLD_SIZE / LOCAL_RANK in each worker's environment; every worker then runs the ordinary `workflow.run(job)`,
so the Trainer trains as one DDP job and rank 0 writes the usual run directory (job.yaml, metrics.json, model,
checkpoints). Ray's own storage (its run records) goes to a temporary folder that is removed afterwards: the run
directory is the result, exactly as with `run-ft`.

`prepare_trainer` and `RayTrainReportCallback` are not used: the first only matters for Ray Data iterables (the
data here are Hugging Face datasets each worker loads itself), and the second copies every checkpoint into Ray's
storage, which would only duplicate the run directory's `checkpoint-*`. The final metrics are reported to Ray once.

Ray is imported only here, and only when the command runs.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .config import Job

INSTALL_HINT = "pip install 'llmfinetune[ray]'"
# Resources Ray measures on the node itself; a worker may ask for them, but they cannot be declared.
RAY_NODE_RESOURCES = ("memory", "object_store_memory")


def resources(job: "Job") -> dict[str, Any]:
    """scaling_config -> what each Ray worker asks for and how the workers are placed; contradictions and impossible
    requests are errors."""
    scaling = job.scaling_config
    given = scaling.model_fields_set
    extra = dict(scaling.resources_per_worker or {})
    # As in the original, resources_per_worker's CPU/GPU stand for num_cpus/num_gpus_per_worker; both differing is
    # a contradiction.
    amounts = {}
    for resource, key in (("CPU", "num_cpus_per_worker"), ("GPU", "num_gpus_per_worker")):
        amounts[resource] = getattr(scaling, key)
        if resource in extra:
            value = float(extra.pop(resource))
            if key in given and value != amounts[resource]:
                raise UserError(f"{job.source}: scaling_config.resources_per_worker.{resource} ({value:g}) and "
                                f"scaling_config.{key} ({amounts[resource]:g}) disagree; keep one.")
            amounts[resource] = value
    negative = [name for name, amount in extra.items() if amount < 0]
    if negative:
        raise UserError(f"{job.source}: scaling_config.resources_per_worker.{negative[0]}: must be at least 0, got "
                        f"{extra[negative[0]]:g}.")
    if amounts["CPU"] <= 0:
        raise UserError(f"{job.source}: scaling_config.resources_per_worker.CPU: must be above 0, got "
                        f"{amounts['CPU']:g}.")
    gpus = amounts["GPU"]
    use_gpu = scaling.use_gpu if scaling.use_gpu is not None else gpus > 0
    if scaling.use_gpu is False and gpus > 0:
        raise UserError(f"{job.source}: scaling_config sets use_gpu: false but num_gpus_per_worker: {gpus:g}; "
                        "set use_gpu: true, or num_gpus_per_worker: 0 to train on the CPU.")
    if use_gpu and gpus == 0:
        gpus = 1  # Ray Train's own default for use_gpu
    strategy = scaling.placement_strategy or "PACK"
    if strategy == "STRICT_SPREAD" and scaling.num_workers > 1:
        raise UserError(f"{job.source}: scaling_config.placement_strategy: STRICT_SPREAD puts every worker on a node "
                        f"of its own, but ray-ft's local cluster is one node ({scaling.num_workers} workers); use "
                        "PACK, SPREAD or STRICT_PACK.")
    return {"num_workers": scaling.num_workers, "use_gpu": use_gpu, "cpus": amounts["CPU"], "gpus": gpus,
            "custom": extra, "placement_strategy": strategy, "pg_timeout_s": scaling.pg_timeout_s}


def scaling_arguments(wanted: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's ScalingConfig arguments for `resources`' answer."""
    per_worker = {"CPU": wanted["cpus"], **({"GPU": wanted["gpus"]} if wanted["use_gpu"] else {}), **wanted["custom"]}
    return {"num_workers": wanted["num_workers"], "use_gpu": wanted["use_gpu"], "resources_per_worker": per_worker,
            "placement_strategy": wanted["placement_strategy"]}


def cluster_resources(wanted: dict[str, Any], gpus: int) -> dict[str, Any]:
    """ray.init arguments of the one-node local cluster: the CPUs and GPUs the workers take, and the custom
    resources of resources_per_worker, which only this node can offer (otherwise the workers would never start).
    A node's amounts are whole numbers for Ray: rounded up."""
    workers = wanted["num_workers"]
    return {"num_cpus": math.ceil(wanted["cpus"] * workers), "num_gpus": gpus,
            "resources": {name: math.ceil(amount * workers) for name, amount in wanted["custom"].items()
                          if name not in RAY_NODE_RESOURCES}}


def _check_gpus(job: "Job", wanted: dict[str, Any]) -> int:
    """The GPUs this machine has; a request for more would leave Ray waiting for resources forever."""
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    needed = wanted["gpus"] * wanted["num_workers"] if wanted["use_gpu"] else 0
    if needed > available:
        raise UserError(
            f"{job.source}: scaling_config asks for {needed:g} GPU(s) ({wanted['num_workers']} worker(s) x "
            f"{wanted['gpus']:g}) but this machine has {available}. Set num_gpus_per_worker: 0 (and use_gpu: false) "
            "to train on the CPU, or lower num_workers."
        )
    return available


def _import_ray():
    try:
        import ray  # noqa: F401
        from ray.train import RunConfig, ScalingConfig  # noqa: F401
        from ray.train.torch import TorchConfig, TorchTrainer  # noqa: F401
    except ImportError as exc:
        raise UserError(f"ray-ft needs Ray Train, which is not installed ({exc}). Install it with: "
                        f"{INSTALL_HINT}") from None
    return ray


def run_on_ray(job_file: str, overrides: list[str], job: "Job") -> int:
    """Train `job` with scaling_config's workers on a local Ray cluster started (and shut down) here."""
    from .workflow import check_job

    from .config import LAUNCHER_ENV, WARNED_ENV

    wanted = resources(job)
    os.environ[LAUNCHER_ENV] = "ray-ft"  # the Ray keys mean something here: no "ray-ft only" warnings
    check_job(job, load_data=False)  # job-file mistakes end here, before a cluster starts
    os.environ[WARNED_ENV] = "1"  # the workers inherit it: the warnings above are not repeated by each of them
    gpus = _check_gpus(job, wanted)
    if wanted["pg_timeout_s"] is not None:
        # Ray Train's controller waits this long for the workers' placement group, then fails with its cause.
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(wanted["pg_timeout_s"])
    # Before Ray is imported (it reads these once): a local cluster on loopback only. Otherwise Ray advertises the
    # machine's network address and the workers' process group listens there. Ray Train's print patch also
    # swallows `print(..., file=...)` and floods the log with datasets' code disassembly: off.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray = _import_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from . import arguments

    output_dir = arguments.run_dir(job)
    # Workers import this package by name: make a checkout that is not installed importable for them.
    package_root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    cluster = cluster_resources(wanted, gpus)
    runtime_env = job.model.initialization.runtime_env or None
    custom = "".join(f", {amount:g} {name}" for name, amount in cluster["resources"].items())
    print(f"Starting a local Ray cluster ({cluster['num_cpus']} CPU(s), {gpus} GPU(s){custom}) for "
          f"{wanted['num_workers']} worker(s), placement {wanted['placement_strategy']}", flush=True)
    storage = Path(tempfile.mkdtemp(prefix="llmfinetune-ray-"))
    ray.init(address="local", **cluster, include_dashboard=False,
             _node_ip_address="127.0.0.1", runtime_env=runtime_env, log_to_driver=True)
    try:
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"job_file": str(Path(job_file).resolve()), "overrides": list(overrides),
                               "cwd": os.getcwd()},
            torch_config=TorchConfig(backend="nccl" if wanted["use_gpu"] else "gloo"),
            scaling_config=ScalingConfig(**scaling_arguments(wanted)),
            run_config=RunConfig(name="llmfinetune", storage_path=str(storage),
                                 # Ray retries a worker group that did not start forever; pg_timeout_s means give up.
                                 **({"failure_config": FailureConfig(controller_failure_limit=0)}
                                    if wanted["pg_timeout_s"] is not None else {})),
        )
        try:
            result = trainer.fit()
        except Exception as exc:  # noqa: BLE001
            raise _placement_timeout(exc, wanted, cluster) or _worker_error(exc) from exc
        error = getattr(result, "error", None)
        if error is not None:
            raise _placement_timeout(error, wanted, cluster) or _worker_error(error) from error
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    import json

    metrics_file = output_dir / "metrics.json"
    world_size = json.loads(metrics_file.read_text())["world_size"] if metrics_file.is_file() else None
    if world_size != wanted["num_workers"]:
        raise RuntimeError(f"Ray ran {wanted['num_workers']} worker(s) but training saw world size {world_size}.")
    print(f"\nDone ({world_size} Ray workers). Model, checkpoints, job.yaml and metrics.json are in: {output_dir}",
          flush=True)
    return 0


def _placement_timeout(exc: BaseException, wanted: dict[str, Any], cluster: dict[str, Any]) -> UserError | None:
    """Ray gave up placing the workers within pg_timeout_s: say what was asked and what the machine has."""
    chain, current = [], exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or getattr(current, "controller_failure", None)
    said = " ".join(f"{type(e).__name__} {e}" for e in chain)
    if wanted["pg_timeout_s"] is None or not ("WorkerGroupStartupTimeoutError" in said
                                              or "worker group startup timed out" in said):
        return None
    asked = ", ".join(f"{name} {amount:g}" for name, amount in scaling_arguments(wanted)["resources_per_worker"].items())
    # Ray's own sentence says how long it waited; its controller's log lines reach the driver asynchronously and can
    # be lost at shutdown, so the error carries it.
    waited = re.search(r"worker group startup timed out after [0-9.]+ seconds waiting for \d+ workers?", said)
    return UserError(
        f"scaling_config.pg_timeout_s: Ray could not place {wanted['num_workers']} worker(s) asking for ("
        f"{asked}) each within {wanted['pg_timeout_s']:g} s on this machine ({cluster['num_cpus']} CPU(s), "
        f"{cluster['num_gpus']} GPU(s){''.join(f', {v} {k}' for k, v in cluster['resources'].items())}). Lower "
        "scaling_config's num_workers, num_*_per_worker or resources_per_worker, or raise pg_timeout_s."
        + (f" (Ray: {waited.group(0)}.)" if waited else "")
    )


def _worker_error(exc: BaseException) -> BaseException:
    """A worker's UserError comes back as itself (one `error:` paragraph); anything else as it is."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return UserError(str(current).splitlines()[0] if "Traceback" in str(current) else str(current))
        stack.extend(getattr(current, "worker_failures", {}).values() if hasattr(current, "worker_failures") else [])
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
    return exc


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the process group is up (RANK, WORLD_SIZE set); run the ordinary job."""
    import ray.train

    from .cli import _setup_logging
    from .config import load_job
    from .workflow import run

    _setup_logging()
    os.chdir(config["cwd"])  # relative paths in the job mean what they meant where ray-ft was started
    if config["cwd"] not in sys.path:
        sys.path.insert(0, config["cwd"])
    job = load_job(config["job_file"], config["overrides"])
    result = run(job)
    ray.train.report({key: value for key, value in result.metrics.items()
                      if isinstance(value, (int, float, str, bool))})
