"""Small file helpers shared by the stages: atomic JSON writes and resumable JSON-lines logs."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Temp file, fsync, then rename: a reader never sees half a file, even after a power cut."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:  # the text's own line endings (a csv's \r\n) as they are
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_folder(folder: Path) -> None:
    """Flushes every file of a folder written to a temporary name, before it is renamed into place."""
    for f in Path(folder).iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npz(path: Path, arrays: dict, row_blocks: dict | None = None) -> None:
    """Temp file, fsync, then rename: a killed writer never leaves a file that looks complete.

    row_blocks: name -> (shape, dtype, blocks), an array written from an iterable of its row
    blocks in order (np.savez's layout), so that it is never whole in memory."""
    import zipfile

    import numpy as np

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    with open(tmp, "wb") as f:
        if not row_blocks:
            np.savez(f, **arrays)
        else:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for name, a in arrays.items():
                    with z.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asanyarray(a), allow_pickle=False)
                for name, (shape, dtype, blocks) in row_blocks.items():
                    dtype, rows = np.dtype(dtype), 0
                    with z.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array_header_1_0(member, {
                            "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
                        for block in blocks:
                            block = np.ascontiguousarray(block, dtype)
                            if block.shape[1:] != tuple(shape[1:]):
                                raise ValueError(f"{name}: a block of shape {block.shape} in an array of {shape}")
                            member.write(block.tobytes())
                            rows += len(block)
                    if rows != shape[0]:
                        raise ValueError(f"{name}: {rows} rows written of {shape[0]}")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_jsonl(path: Path, step: int) -> None:
    """Drops log lines past the restored step, so a resumed run logs each step once."""
    path = Path(path)
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON object a stage wrote (a manifest); missing, damaged or not an object is a one-line
    error naming the file and how to fix it."""
    from nlrw_jax.errors import UserError

    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a JSON object; {fix}")
    return obj


def _unreadable(path: Path, e: Exception, fix: str):
    from nlrw_jax.errors import UserError

    return UserError(f"{path}: unreadable ({type(e).__name__}); {fix}")


def read_npz(path: Path, fix: str, needed=(), names=None) -> dict:
    """Every array (or only those in `names`) of an .npz a stage wrote; unreadable (truncated, not a
    zip) or lacking one of `needed` is a one-line error naming the file and how to fix it."""
    import numpy as np

    from nlrw_jax.errors import UserError

    try:
        with np.load(path, allow_pickle=False) as z:  # lazy per member: only `names` are read
            arrays = {k: z[k] for k in z.files if names is None or k in names}
    except Exception as e:  # noqa: BLE001 - any damage to the file is the user's to fix
        raise _unreadable(path, e, fix) from None
    missing = sorted(set(needed) - set(arrays))
    if missing:
        raise UserError(f"{path}: missing array(s) {', '.join(missing)}; {fix}")
    return arrays


def _npy_header(f):
    """(shape, fortran_order, dtype) of the .npy at f's position, leaving f at the first data byte."""
    import numpy as np

    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version not in ((1, 0), (2, 0)):  # 3.0 is only for utf-8 field names, which no stage writes
        raise ValueError(f"npy format version {version}")
    shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
    if dtype.hasobject:
        raise ValueError("object arrays need pickle")
    return shape, fortran, dtype


def npz_members(path: Path, fix: str) -> dict:
    """name -> (shape, dtype) of every array of an .npz, from the members' headers only (cheap
    even when the arrays are GBs); damage is read_npz's one-line error."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            out = {}
            for member in z.namelist():
                if member.endswith(".npy"):
                    with z.open(member) as f:
                        shape, _, dtype = _npy_header(f)
                    out[member[:-4]] = (shape, dtype)
            return out
    except Exception as e:  # noqa: BLE001 - any damage to the file is the user's to fix
        raise _unreadable(path, e, fix) from None


def npz_row_blocks(path: Path, name: str, rows_per_block: int, fix: str):
    """Yields one array of an .npz as consecutive blocks of at most rows_per_block rows, read from
    the member as they are needed, so that only one block is in memory (stored or deflated members
    alike; a 0-d array comes whole). A Fortran-order array (which save_npz's row blocks never are)
    is read whole, its rows not being contiguous. Damage (truncated, bad CRC, missing member) is
    read_npz's one-line error, raised when reached."""
    import zipfile

    import numpy as np

    from nlrw_jax.errors import UserError

    def read(f, n):
        data = f.read(n)
        if len(data) != n:
            raise EOFError("member shorter than its header says")
        return data

    step = max(1, int(rows_per_block))
    try:
        with zipfile.ZipFile(path) as z:
            if name + ".npy" not in z.namelist():
                raise UserError(f"{path}: missing array(s) {name}; {fix}")
            with z.open(name + ".npy") as f:
                shape, fortran, dtype = _npy_header(f)
                rows = shape[0] if shape else 1
                row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                if fortran:  # columns, not rows, are contiguous: read it whole
                    whole = np.frombuffer(read(f, rows * row_bytes), dtype).reshape(shape[::-1]).T
                    yield from (whole[lo:lo + step] for lo in range(0, rows, step))
                    return
                for lo in range(0, rows, step):
                    k = min(step, rows - lo)
                    yield np.frombuffer(read(f, k * row_bytes), dtype).reshape((k, *shape[1:]) if shape else ())
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage to the file is the user's to fix
        raise _unreadable(path, e, fix) from None


def restore_checkpoint(manager, step: int, args):
    """orbax restore of `step`; a corrupt or partial checkpoint is a one-line error naming its folder."""
    from nlrw_jax.errors import UserError

    try:
        return manager.restore(step, args=args)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"checkpoint {Path(manager.directory) / str(step)} could not be restored: "
                        f"{type(e).__name__}: {first}") from None


def abstract_like(tree):
    """Shapes, dtypes and shardings of a pytree of arrays: the restore target for orbax."""
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def read_batches(path: Path, sizes: dict[int, int]) -> dict[int, list[dict]]:
    """Resumable JSON-lines output written a batch at a time: each record carries "batch", and
    `sizes[b]` is how many records batch b has. A kill can leave a torn last line or a partial
    batch: both are dropped (and the file rewritten without them), so that batch is redone once."""
    path = Path(path)
    if not path.exists():
        return {}
    groups: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed write
        groups.setdefault(rec.get("batch"), []).append(rec)
    done = {b: recs for b, recs in groups.items() if b in sizes and len(recs) == sizes[b]}
    if sum(map(len, done.values())) != sum(map(len, groups.values())):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for b in sorted(done) for r in done[b]))
        os.replace(tmp, path)
    return done


def append_batch(path: Path, records: list[dict]) -> None:
    """One write + fsync per batch: a later reader sees the whole batch or drops it."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
