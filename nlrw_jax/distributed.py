"""Multi-host JAX: one process per host, all running the same command.

`initialize` starts `jax.distributed` from the `distributed` config section, which the
environment (NLRW_COORDINATOR, NLRW_NUM_PROCESSES, NLRW_PROCESS_ID) overrides. After it,
`jax.devices()` lists every host's devices and a mesh built from them spans the hosts.

Which stages take part: capture and train (and pretrain) run on every process, each on its
share of the data. Every other stage is single-host work (statistics, LLM calls, reports) and
runs on process 0 only, while the others wait for it at a barrier, so that all leave together
(see cli.py).
"""

from __future__ import annotations

import os

import jax

from nlrw_jax.errors import UserError

ENV = {"coordinator": "NLRW_COORDINATOR", "num_processes": "NLRW_NUM_PROCESSES", "process_id": "NLRW_PROCESS_ID"}


def settings(dist_cfg) -> dict:
    """The config's coordinator / num_processes / process_id with the environment's on top."""
    out = {"coordinator": dist_cfg.coordinator, "num_processes": dist_cfg.num_processes,
           "process_id": dist_cfg.process_id}
    for key, var in ENV.items():
        value = os.environ.get(var)
        if value is None or value == "":
            continue
        if key != "coordinator":
            try:
                value = int(value)
            except ValueError:
                raise UserError(f"environment variable {var}={value!r} is not an integer") from None
        out[key] = value
    return out


def initialize(dist_cfg) -> None:
    """Joins the cluster once per process; a no-op for a single process (coordinator "")."""
    s = settings(dist_cfg)
    if not s["coordinator"] or jax.distributed.is_initialized():
        return
    # Must be set before the CPU backend starts; TPU/GPU backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", dist_cfg.cpu_collectives)
    if s["coordinator"] == "auto":
        jax.distributed.initialize()  # TPU pods (and Slurm / MPI) describe themselves
        jax.devices()
        return
    host, _, port = s["coordinator"].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"config key distributed.coordinator: {s['coordinator']!r} is not host:port or 'auto'")
    n, pid = s["num_processes"], s["process_id"]
    if n is None or pid is None or not 0 <= pid < n:
        raise UserError(f"distributed.coordinator {s['coordinator']} needs num_processes >= 1 and process_id in "
                        f"[0, num_processes) (got {n} and {pid}; or set {ENV['num_processes']} / {ENV['process_id']})")
    jax.distributed.initialize(coordinator_address=s["coordinator"], num_processes=n, process_id=pid)
    jax.devices()  # every process must start its backend: process 0's waits for all hosts' devices


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str, timeout_s: float = 7 * 24 * 3600) -> None:
    """Every process waits here until all have arrived: the coordination service's barrier, not a
    device collective, so it may wait as long as process 0's single-host work takes (JAX's own
    shutdown barrier gives up after 5 minutes). A no-op for one process."""
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed  # the client JAX's own checkpointing uses

        jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def primary_first(fn):
    """fn() on process 0, then on the others: for shared files (token caches) one host builds
    and the rest find them built."""
    name = f"primary_first:{getattr(fn, '__name__', 'fn')}"
    if is_primary():
        out = fn()
        barrier(name)
        return out
    barrier(name)
    return fn()


def gather(tree):
    """A pytree of (possibly cross-host) arrays as NumPy on every process. Collective: every
    process must call it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
