"""Device mesh construction: axes ('data', 'model'); -1 means "whatever is left"."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nlrw_jax.errors import UserError


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, model]
    if sizes.count(-1) > 1:
        raise UserError("mesh: at most one of mesh.data / mesh.model may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise UserError(f"mesh: data={data} x model={model} does not fit {len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise UserError(f"mesh: data={sizes[0]} x model={sizes[1]} != {len(devices)} devices")
    return Mesh(np.array(devices).reshape(sizes), ("data", "model"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches: leading axis over 'data'."""
    return NamedSharding(mesh, P("data"))


def global_batch(mesh: Mesh, host_batch: np.ndarray) -> jax.Array:
    """This host's rows of a batch -> one global array sharded over 'data' (multi-host safe)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), host_batch)
