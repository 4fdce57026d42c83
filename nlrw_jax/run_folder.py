"""The run folder: where each stage writes, who may write there, and what it was made from.

Every path under run_dir is named here and nowhere else. A stage *claims* its folder before it
writes: it takes an advisory lock (released by the OS if the process dies; a second process gets
one line naming the holder's pid and host, exit status 75), then compares what its results
depend on (its identity: the config keys that change results, and the content hashes of the
model and of every input it reads) with `identity.json` in the folder. A folder made from
anything else is refused; a fresh one records the identity. Stages validate everything first and
claim after, so a rejected value never leaves a folder that blocks the corrected rerun.

Parallel writers by design (the hosts of a multi-host capture, `simulate --shard i`) claim a
*part*: they share the folder's lock and each holds its part's lock alone.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import socket
from pathlib import Path

from nlrw_jax.errors import ServiceUnavailable, UserError
from nlrw_jax.io import read_json_object, write_json

IDENTITY_FILE = "identity.json"

# stage -> its folder under run_dir (eval writes one file, kept in a folder for its claim)
STAGE_DIRS = {
    "eval": "eval", "capture": "activations", "train": "sparse", "examples": "examples", "explain": "explain",
    "score": "scores", "simulate": "simulate", "calibrate": "calibrate", "evaluate": "evaluate", "report": "report",
    "pretrain": "pretrain",
}


def short_hash(obj) -> str:
    """A stable 16-hex-digit hash of a JSON-able object (a config identity, a list of latents)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """A stage output's identity as another stage's input: the hash of its bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]


class RunFolder:
    """run_dir and everything in it. Stages get their inputs' paths and readers from here."""

    def __init__(self, root):
        self.root = Path(root)

    def dir(self, stage: str) -> Path:
        return self.root / STAGE_DIRS[stage]

    # --------------------------------------------------------------------------- stage outputs
    @property
    def eval_json(self) -> Path:
        return self.dir("eval") / "eval.json"

    @property
    def activations(self) -> Path:
        return self.dir("capture")

    @property
    def checkpoints(self) -> Path:
        return self.dir("train") / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.dir("train") / "metrics.jsonl"

    @property
    def pretrain_checkpoints(self) -> Path:
        return self.dir("pretrain") / "checkpoints"

    @property
    def pretrain_metrics(self) -> Path:
        return self.dir("pretrain") / "metrics.jsonl"

    @property
    def train_summary(self) -> Path:
        return self.dir("train") / "summary.json"

    @property
    def coder(self) -> Path:
        """The trained coder in sparsify's format (cfg.json + sae.safetensors)."""
        return self.dir("train") / "sparsify"

    @property
    def examples(self) -> Path:
        return self.dir("examples") / "examples.npz"

    @property
    def examples_partial(self) -> Path:
        return self.dir("examples") / "partial.npz"

    @property
    def explanations(self) -> Path:
        return self.dir("explain") / "explanations.jsonl"

    @property
    def scores(self) -> Path:
        return self.dir("score") / "scores.jsonl"

    @property
    def score_table(self) -> Path:
        return self.dir("score") / "table.csv"

    @property
    def ranking(self) -> Path:
        return self.dir("score") / "ranking.json"

    @property
    def score_summary(self) -> Path:
        return self.dir("score") / "summary.json"

    @property
    def contexts(self) -> Path:
        return self.dir("simulate") / "contexts.npz"

    def shard(self, k: int) -> Path:
        return self.dir("simulate") / "shards" / f"{k:05d}.npz"

    def quantile_map(self, estimator: str, size: int) -> Path:
        return self.dir("calibrate") / "maps" / f"{estimator}_{size}.npz"

    @property
    def true_frequency(self) -> Path:
        return self.dir("calibrate") / "true_frequency.npz"

    @property
    def results(self) -> Path:
        return self.dir("evaluate") / "results.json"

    @property
    def results_table(self) -> Path:
        return self.dir("evaluate") / "table.csv"

    @property
    def values(self) -> Path:
        return self.dir("evaluate") / "values.npz"

    @property
    def report(self) -> Path:
        return self.dir("report") / "report.md"


    # --------------------------------------------------------------------------- typed readers
    def read_coder(self):
        """(params, meta, content hash) of the trained transcoder / SAE."""
        weights = self.coder / "sae.safetensors"
        if not weights.exists():
            raise UserError(f"{self.coder}: no trained coder; run `nlrw train` first")
        digest = file_digest(weights)
        params, meta = _load_sparsify(str(self.coder), digest)
        return params, meta, digest

    def made_from(self, stage: str) -> dict:
        """What a finished stage's outputs were made from; without that record they cannot be trusted."""
        ident = self.identity(stage)
        if ident is None:
            raise UserError(f"{self.dir(stage) / IDENTITY_FILE}: missing, so what these outputs were made from is "
                            f"unknown; delete {self.dir(stage)} and rerun `nlrw {stage}`")
        return ident

    def read_examples(self, coder_hash: str) -> dict:
        """The examples arrays (EXAMPLE_ARRAYS), checked to be of the coder `coder_hash`."""
        from nlrw_jax.interpret.examples import EXAMPLE_ARRAYS
        from nlrw_jax.io import read_npz

        if not self.examples.exists():
            raise UserError(f"{self.examples}: no examples; run `nlrw examples` first")
        data = read_npz(self.examples, "delete it and rerun `nlrw examples`", EXAMPLE_ARRAYS)
        made_for = self.made_from("examples").get("coder")
        if made_for != coder_hash:
            raise UserError(f"{self.examples}: made for another transcoder ({made_for}, the run's is {coder_hash}); "
                            f"delete {self.dir('examples')} and rerun `nlrw examples`")
        return data

    def read_explanations(self, coder_hash: str) -> dict[int, str | None]:
        """{latent: explanation or None (skipped)}, checked to be of the coder `coder_hash`."""
        from nlrw_jax.interpret.explain import read_explanations

        if not self.explanations.exists():
            raise UserError(f"{self.explanations}: no explanations; run `nlrw explain` first")
        made_for = self.made_from("explain").get("coder")
        if made_for != coder_hash:
            raise UserError(f"{self.explanations}: explanations of another transcoder ({made_for}; this run's is "
                            f"{coder_hash})")
        return read_explanations(self.explanations)

    def read_ranking(self) -> list[int]:
        """The latents by detection score, best first."""
        if not self.ranking.exists():
            raise UserError(f"{self.ranking}: no ranking; run `nlrw score` first")
        try:
            ranking = json.loads(self.ranking.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{self.ranking}: unreadable ranking ({type(e).__name__}); rerun `nlrw score`") from None
        if not isinstance(ranking, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranking):
            raise UserError(f"{self.ranking}: not a list of latent ids; rerun `nlrw score`")
        return ranking

    def read_contexts(self) -> dict:
        """The simulation contexts: windows [W, ctx], window [N] (each context's row of windows),
        positions [N], n_eval, and the coder's top-k there (nlrw_jax.stages.simulate.make_contexts)."""
        import numpy as np

        from nlrw_jax.io import read_npz

        if not self.contexts.exists():
            raise UserError(f"{self.contexts}: no simulation contexts; run `nlrw simulate` first")
        fix = "delete the simulate folder and rerun `nlrw simulate`"
        out = read_npz(self.contexts, fix, ("windows", "positions", "n_eval", "top_acts", "top_idx"))
        if "window" not in out:  # written before all_at_once existed: one context per window
            out["window"] = np.arange(len(out["positions"]), dtype=np.int32)
        w, p = out["window"], out["positions"]
        if len(w) != len(p) or (len(w) and not (0 <= w.min() and w.max() < len(out["windows"]) and
                                                0 <= p.min() and p.max() < out["windows"].shape[1] - 1)):
            raise UserError(f"{self.contexts}: window/positions out of range of its windows; {fix}")
        return out

    def read_predictions(self, grid: list[tuple[int, int, int, int]], latents, n_contexts: int, rows=slice(None),
                         reduce=None):
        """The digit log-probs [rows, latents, 10] at the context `rows` (a slice or an index array;
        default all) or, with `reduce` (a shard's log-probs [c, l, 10] -> [c, l]), what it makes of
        them, [rows, latents] float32: applied shard by shard, so [contexts, latents, 10] (42 GB at
        the paper's widths) never exists. Only the shards that cover `rows` are read, each checked
        to cover its cell of the grid (nothing counted twice or missed) and to hold no NaN; every
        shard must exist (a missing one is an unfinished simulation, whatever rows are asked for)."""
        import numpy as np

        from nlrw_jax.interpret import prompts as P
        from nlrw_jax.io import read_npz
        from nlrw_jax.rewrite.simulate import check_finite_or_inf

        missing = [k for k in range(len(grid)) if not self.shard(k).exists()]
        if missing:
            raise UserError(f"{self.dir('simulate') / 'shards'}: {len(missing)} of {len(grid)} shards missing "
                            f"(first: {missing[0]}); run `nlrw simulate` (or the remaining --shard workers) first")
        rows = np.arange(n_contexts)[rows]
        order = np.argsort(rows, kind="stable")  # a shard's rows: one searchsorted, not a scan per shard
        by_row = rows[order]
        out = np.empty((len(rows), len(latents)) + (() if reduce else (len(P.DIGITS),)), np.float32)
        for k, (c0, c1, l0, l1) in enumerate(grid):
            mine = order[np.searchsorted(by_row, c0):np.searchsorted(by_row, c1)]
            if not len(mine):
                continue
            path = self.shard(k)
            shard = read_npz(path, "delete it and rerun `nlrw simulate`", ("logprobs", "contexts", "latents"))
            lp, crange, lat = shard["logprobs"], shard["contexts"], shard["latents"]
            if list(crange) != [c0, c1] or not np.array_equal(lat, latents[l0:l1]) or \
                    lp.shape != (c1 - c0, l1 - l0, 10):
                raise UserError(f"{path}: covers other contexts/latents than shard {k} of this grid; delete it "
                                f"and rerun")
            check_finite_or_inf(lp, lat, str(path))
            lp = lp[rows[mine] - c0]
            out[mine, l0:l1] = reduce(lp) if reduce else lp
        return out

    # --------------------------------------------------------------------------- identity
    def identity(self, stage: str) -> dict | None:
        """What `stage`'s folder was made from, or None if it was never claimed."""
        path = self.dir(stage) / IDENTITY_FILE
        if not path.exists():
            return None
        return read_json_object(path, f"what {self.dir(stage)} was made from is unknown: delete it and rerun "
                                      f"`nlrw {stage}`")

    def identity_hash(self, stage: str) -> str:
        """The identity of a finished stage's outputs, as an input of the stages after it."""
        ident = self.identity(stage)
        if ident is None:
            raise UserError(f"{self.dir(stage)}: nothing there yet; run `nlrw {stage}` first")
        return short_hash(ident)

    def check(self, stage: str, identity: dict) -> None:
        """Refuses `stage`'s outputs if they were made from anything other than `identity`."""
        old = self.identity(stage)
        if old is None:
            raise UserError(f"{self.dir(stage)}: nothing there yet; run `nlrw {stage}` first")
        _compare(self.dir(stage) / IDENTITY_FILE, old, identity, stage)

    @contextlib.contextmanager
    def lock(self, stage: str, part: str | None = None):
        """This process's lock on `stage`'s folder (or on one part of it, the folder's lock shared);
        yields the folder."""
        folder = self.dir(stage)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"run folder {folder} cannot be created: {e.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise UserError(f"run folder {folder} is not writable")
        with contextlib.ExitStack() as stack:
            stack.enter_context(_lock(folder / ".lock", exclusive=part is None, what=f"nlrw {stage}"))
            if part is not None:
                stack.enter_context(_lock(folder / f".lock.{part}", exclusive=True, what=f"nlrw {stage} ({part})"))
            yield folder

    @contextlib.contextmanager
    def claim(self, stage: str, identity: dict, part: str | None = None):
        """Locks `stage`'s folder (or one part of it) for this process and checks or records its
        identity; yields the folder. Call it only once every input has been validated. A folder
        that holds outputs but no identity is refused: what they were made from is unknown."""
        with self.lock(stage, part) as folder:
            path = folder / IDENTITY_FILE
            if path.exists():
                _compare(path, self.identity(stage), identity, stage)
            else:
                outputs = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".lock"))
                if outputs:
                    raise UserError(f"{folder} holds {', '.join(outputs[:3])}{', ...' if len(outputs) > 3 else ''} "
                                    f"but no {IDENTITY_FILE}, so what they were made from is unknown; delete it to "
                                    f"redo `nlrw {stage}`")
                write_json(path, identity)
            yield folder

    def record(self, stage: str, identity: dict) -> None:
        """For outputs derived from others' (the report): what the current outputs were made from,
        written after they are complete, so a stale identity never vouches for new outputs."""
        write_json(self.dir(stage) / IDENTITY_FILE, identity)


@functools.lru_cache(maxsize=4)
def _load_sparsify(folder: str, digest: str):
    """The coder's weights, loaded once per content (several stages in one process read them)."""
    from nlrw_jax.sparse.sparsify_format import load_sparsify

    return load_sparsify(Path(folder))


def _compare(path: Path, old: dict, new: dict, stage: str) -> None:
    if old != new:
        differs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise UserError(f"{path}: this run folder's {stage} outputs were made from something else (differs: "
                        f"{', '.join(differs)}); use a new run_dir, or delete {path.parent} to redo it")


@contextlib.contextmanager
def _lock(path: Path, exclusive: bool, what: str):
    """An advisory file lock (flock): released by the OS when the process dies. Where the file
    system has no locks (some network mounts), the stage runs unlocked."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # read-only folder or file system: before any work, one line
        raise UserError(f"run folder {path.parent} is not writable: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ServiceUnavailable(f"{path.parent} is in use by {holder}; wait for it to finish (or stop it) "
                                     f"and rerun") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        if True:  # who holds it, for the message a second process gets (last writer wins: informational)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} ({what})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
