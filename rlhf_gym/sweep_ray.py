"""Sweep cells as Ray tasks (`backend: ray` in a sweep's config, issue 15), on a local Ray instance or a cluster.

Only the way a cell is submitted differs from the local process pool: each cell runs `run_cell` as a Ray
task and returns its results row and curve rows to the sweep's main process, which writes them exactly as
it does for the pool (`rlhf_gym.sweep._run_cells`). results.csv, curves.csv, failures.jsonl and resuming a
killed sweep are therefore the same on both backends.

Ray is an optional extra (`pip install -e '.[ray]'`), imported here only, and this module only when a sweep
asks for Ray: `import rlhf_gym` never needs it.

What a cluster needs (`ray_address` set): rlhf-gym, and any package your agents or tasks come from,
installed on every node in the Python that runs Ray; and the files a cell reads (env.model,
env.reward_model, env.prompts, the files of `agent_configs`) at the same path on every node, i.e. a shared
filesystem. A relative path is read from the main process's working directory, as the local workers read
it: each task enters that folder when its node has it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from rlhf_base.config import ConfigError

__all__ = ["import_ray", "ray_backend"]

INSTALL_HINT = "pip install -e '.[ray]'"
_ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the task name in its error text


def import_ray() -> Any:
    """The `ray` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ModuleNotFoundError as e:
        if e.name != "ray":
            raise  # Ray is there but broken: its own error says more than ours would
        raise ImportError(
            f"a sweep with backend: ray needs Ray, an optional extra of rlhf-gym: {INSTALL_HINT} "
            "(or use backend: local)"
        ) from e
    return ray


@contextlib.contextmanager
def ray_backend(config: Any, run_cell: Callable[[Any, Any], Any]) -> Iterator[Callable[[Any], Any]]:
    """Connect to Ray (or start a local instance), check that a cell fits on some node, and yield a
    `submit(cell) -> Future` that runs `run_cell(cell, config)` as a task holding `config.cell_resources`.

    A program that has called `ray.init` itself keeps its connection (`ray_address` is then not used) and
    its Ray stays up after the sweep; a Ray this function started is shut down when the sweep ends.

    Args:
        config: the sweep's `SweepConfig` (its `ray_address` and `cell_resources` are read here).
        run_cell: `rlhf_gym.sweep.run_cell`, passed in so that this module need not import the sweep's.

    Raises:
        ImportError: Ray is not installed (the message says how to install it).
        ConfigError: no node of the cluster has the CPUs and GPUs that one cell asks for; its cells would
            wait forever.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        if config.ray_address is None:
            ray.init(address="local", include_dashboard=False)
        else:
            try:
                ray.init(address=config.ray_address)
            except ConnectionError as e:
                raise ConnectionError(
                    f"no Ray cluster at ray_address={config.ray_address!r} ({e}); start one there "
                    "(`ray start --head`), or set ray_address: null to start a local Ray instance"
                ) from e
    in_flight: set[Any] = set()
    try:
        resources = config.cell_resources
        _check_fits(ray, resources.num_cpus, resources.num_gpus)
        task = ray.remote(_run_in_folder).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, name="sweep_cell"
        )
        config_ref = ray.put(config)  # sent to the object store once, not with every cell
        folder = os.getcwd()

        def submit(cell: Any) -> concurrent.futures.Future:
            ref = task.remote(folder, run_cell, cell, config_ref)
            in_flight.add(ref)
            future = _future(ray, ref)
            future.add_done_callback(lambda _: in_flight.discard(ref))
            return future

        yield submit
    finally:
        # Tasks left by an error or Ctrl-C in the main process: stop them rather than let them run on.
        for ref in list(in_flight):
            with contextlib.suppress(Exception):  # the error that brought us here is the one to see
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _run_in_folder(folder: str, run_cell: Callable[[Any, Any], Any], cell: Any, config: Any) -> Any:
    """One cell, in a Ray worker: from the main process's working directory when this node has it, so that a
    relative path (runs/NAME/sft) means what it means to the main process, as it does to a local worker."""
    if os.path.isdir(folder):
        os.chdir(folder)
    return run_cell(cell, config)


def _check_fits(ray: Any, num_cpus: float, num_gpus: float) -> None:
    """Refuse a sweep whose cells fit on no node: Ray would hold them pending forever, saying nothing."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(node.get("CPU", 0) >= num_cpus and node.get("GPU", 0) >= num_gpus for node in nodes):
        return
    sizes = sorted({f"{node.get('CPU', 0):g} CPU + {node.get('GPU', 0):g} GPU" for node in nodes})
    raise ConfigError(
        f"cell_resources (num_cpus: {num_cpus:g}, num_gpus: {num_gpus:g}) fit on no node of the Ray cluster "
        f"(its nodes: {', '.join(sizes) or 'none'}); a cell runs on one node: lower cell_resources, or add a "
        "node that large before starting the sweep"
    )


def _future(ray: Any, ref: Any) -> concurrent.futures.Future:
    """A future of the task's result whose error is the cell's own exception (not Ray's wrapper), its remote
    traceback chained as the cause, as a process pool's future gives it: failures.jsonl reads the same."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def settle(done: concurrent.futures.Future) -> None:
        error = done.exception()
        if error is None:
            future.set_result(done.result())
            return
        try:
            cause = vars(error).get("cause")  # RayTaskError(X) passes other attributes on to the cause
            if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, Exception):
                cause.__cause__ = _RemoteTraceback(_ANSI_CODES.sub("", str(error)))
                error = cause
        finally:  # settled whatever happens above: a future left pending would hang the sweep
            future.set_exception(error)

    ref.future().add_done_callback(settle)
    return future


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a Ray worker (as `concurrent.futures.process` keeps one)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text
