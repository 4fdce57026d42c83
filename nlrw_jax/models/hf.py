"""Hugging Face GPT-NeoX checkpoints <-> Flax parameters.

Loads a local HF folder (config.json + model.safetensors, sharded safetensors with an index,
or pytorch_model.bin) or a hub name with a revision. Each tensor is read from a memory map
and placed on its devices with `jax.make_array_from_callback`, so each device receives only
its own shard and no full host copy is made per device.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nlrw_jax.errors import UserError
from nlrw_jax.io import fsync_folder
from nlrw_jax.models.gpt_neox import GPTNeoX, GPTNeoXConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Buffers that old GPT-NeoX checkpoints store but that are recomputed, not learned.
_IGNORED_TENSOR_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
_ALIASES = {"embed_out.weight": "lm_head.weight"}


def hf_name_map(config: GPTNeoXConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Flax parameter path -> (HF tensor name, transpose?)."""
    m = {("embed_in", "embedding"): ("gpt_neox.embed_in.weight", False),
         ("final_layer_norm", "ln", "scale"): ("gpt_neox.final_layer_norm.weight", False),
         ("final_layer_norm", "ln", "bias"): ("gpt_neox.final_layer_norm.bias", False),
         ("embed_out", "kernel"): ("embed_out.weight", True)}
    for i in range(config.num_hidden_layers):
        hf = f"gpt_neox.layers.{i}"
        for ln in ("input_layernorm", "post_attention_layernorm"):
            m[(f"layers_{i}", ln, "ln", "scale")] = (f"{hf}.{ln}.weight", False)
            m[(f"layers_{i}", ln, "ln", "bias")] = (f"{hf}.{ln}.bias", False)
        for block, dense in (("attention", "query_key_value"), ("attention", "dense"),
                             ("mlp", "dense_h_to_4h"), ("mlp", "dense_4h_to_h")):
            m[(f"layers_{i}", block, dense, "kernel")] = (f"{hf}.{block}.{dense}.weight", True)
            m[(f"layers_{i}", block, dense, "bias")] = (f"{hf}.{block}.{dense}.bias", False)
    return m


def expected_shapes(config: GPTNeoXConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = jax.eval_shape(lambda: GPTNeoX(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    return {tuple(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]}


def default_sharding_rule(path: tuple[str, ...], shape: tuple[int, ...]) -> P:
    """Megatron-style: the wide axis of each matrix over 'model'; vectors and norms replicated."""
    name = "/".join(path)
    if name.endswith(("query_key_value/kernel", "dense_h_to_4h/kernel", "embed_out/kernel")):
        return P(None, "model")
    if name.endswith(("attention/dense/kernel", "dense_4h_to_h/kernel", "embed_in/embedding")):
        return P("model", None)
    return P()


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops the mesh axis from any dimension it does not divide (e.g. a vocab of 50277 over 8)."""
    axes = tuple(spec) + (None,) * (len(shape) - len(spec))
    return P(*(a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(axes)))


def resolve_checkpoint(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder, or a hub name downloaded (config, weights, tokenizer) at `revision`."""
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        if not path.is_dir():
            raise UserError(f"checkpoint folder {name_or_path} does not exist or is not a folder")
        if not os.access(path, os.R_OK | os.X_OK):
            raise UserError(f"checkpoint folder {name_or_path} is not readable")
        return path
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=[
            "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*.json", "special_tokens_map.json"]))
    except Exception as e:  # network, auth, missing revision: one line naming the model
        raise UserError(f"no local folder {name_or_path}, and it could not be fetched (revision {revision}) from the "
                        f"Hugging Face hub: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def content_hash(folder: str | os.PathLike) -> str:
    """sha256 of a checkpoint's content: config.json and every weight file (name and full bytes).

    Where the folder lies does not count (a copy is the same model); any changed byte does, also
    one in the middle of a large file. Each file's hash is remembered in-process under its
    absolute path, size and mtime, so asking again (or for a second capture) costs a stat.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    try:
        names = sorted(f.name for f in folder.iterdir()
                       if f.suffix in (".safetensors", ".bin") or f.name == "model.safetensors.index.json")
        for name in ["config.json", *names]:
            path = folder / name
            st = path.stat()
            h.update(f"{name}:{_file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)}\n".encode())
    except OSError as e:
        raise UserError(f"cannot hash checkpoint {folder}: {e.filename}: {e.strerror or e}") from None
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; size and mtime_ns only key the cache (a rewritten file is hashed again)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def read_config(folder: Path) -> GPTNeoXConfig:
    cfg_path = folder / "config.json"
    try:
        data = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{cfg_path} is missing: a Hugging Face checkpoint folder needs config.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg_path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{cfg_path} is not a JSON object")
    return GPTNeoXConfig.from_hf_dict(data, source=str(cfg_path))


class _TensorReader:
    """Lazy access to every tensor of a checkpoint folder, whatever its file layout."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder, self._files, self._torch = folder, {}, None
        if (folder / "model.safetensors").exists():
            self._index = {k: "model.safetensors" for k in self._open(safe_open, "model.safetensors").keys()}
        elif (folder / "model.safetensors.index.json").exists():
            idx_path = folder / "model.safetensors.index.json"
            try:
                self._index = json.loads(idx_path.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{idx_path} is not a valid safetensors index: {e}") from None
            for f in sorted(set(self._index.values())):
                self._open(safe_open, f)
        elif (folder / "pytorch_model.bin").exists():
            try:
                import torch
            except ImportError:
                raise UserError(f"{folder}/pytorch_model.bin needs torch to read; install torch or convert to safetensors") from None
            try:
                self._torch = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise UserError(f"{folder}/pytorch_model.bin is not a readable PyTorch checkpoint: {e}") from None
            self._index = {k: None for k in self._torch}
        else:
            raise UserError(f"checkpoint folder {folder} has no weights: expected one of {list(WEIGHT_FILES)}")

    def _open(self, safe_open, name):
        try:
            self._files[name] = safe_open(self.folder / name, framework="numpy")
        except Exception as e:
            raise UserError(f"{self.folder / name} is not a readable safetensors file: {e}") from None
        return self._files[name]

    def keys(self):
        return self._index.keys()

    def resolve(self, name: str) -> str | None:
        """The stored name of a tensor; transformers >= 5 state dicts call embed_out lm_head."""
        for candidate in (name, _ALIASES.get(name)):
            if candidate in self._index:
                return candidate
        return None

    def get(self, name: str) -> np.ndarray:
        if self._torch is not None:
            t = self._torch[name]
            return t.float().numpy() if t.dtype.is_floating_point and str(t.dtype) == "torch.bfloat16" else t.numpy()
        try:
            return self._files[self._index[name]].get_tensor(name)
        except Exception as e:
            raise UserError(f"{self.folder}: tensor {name} could not be read: {e}") from None


def load(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    sharding_rule: Callable[[tuple[str, ...], tuple[int, ...]], P] = default_sharding_rule,
) -> tuple[GPTNeoXConfig, dict]:
    """Returns (config, params); params are `dtype` and, with a mesh, sharded by `sharding_rule`."""
    folder = resolve_checkpoint(str(name_or_path), revision)
    config = read_config(folder)
    reader = _TensorReader(folder)
    names = hf_name_map(config)
    shapes = expected_shapes(config)
    known = {reader.resolve(hf) for hf, _ in names.values()}
    extra = [k for k in reader.keys() if k not in known and not k.endswith(_IGNORED_TENSOR_SUFFIXES)]
    if extra:
        raise UserError(f"{folder}: tensors {extra[:3]}{'...' if len(extra) > 3 else ''} are not part of a "
                        f"GPT-NeoX model with this config.json")
    np_dtype = jnp.dtype(dtype)  # a numpy dtype, bfloat16 included (ml_dtypes)
    flat = {}
    for path, (hf_name, transpose) in names.items():
        stored = reader.resolve(hf_name)
        if stored is None:
            raise UserError(f"{folder}: tensor {hf_name} is missing")
        array = reader.get(stored)
        if transpose:
            array = array.T
        if array.shape != shapes[path]:
            raise UserError(f"{folder}: tensor {hf_name} has shape {tuple(array.T.shape if transpose else array.shape)}, "
                            f"but config.json implies {tuple(reversed(shapes[path]) if transpose else shapes[path])}")
        flat[path] = _place(array, np_dtype, mesh, sharding_rule(path, array.shape) if mesh is not None else None)
    return config, _unflatten(flat)


def _place(array: np.ndarray, np_dtype, mesh: Mesh | None, spec: P | None) -> jax.Array:
    if mesh is None:
        return jnp.asarray(array.astype(np_dtype, copy=False))
    sharding = NamedSharding(mesh, fit_spec(spec, array.shape, mesh))
    # Each device reads and converts only its own slice of the memory-mapped tensor.
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: np.asarray(array[idx], dtype=np_dtype))


def _unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def save(config: GPTNeoXConfig, params: dict, out_dir: str | os.PathLike, *, dtype: str = "float32",
         tokenizer_file: str | os.PathLike | None = None) -> Path:
    """Writes config.json + model.safetensors (+ tokenizer.json) atomically: temp folder, then rename."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}[dtype]
    tensors = {}
    for path, (hf_name, transpose) in hf_name_map(config).items():
        node = params
        for key in path:
            node = node[key]
        array = np.asarray(jax.device_get(node), dtype=np.float32)
        tensors[hf_name] = np.ascontiguousarray((array.T if transpose else array).astype(np_dtype))
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_hf_dict()
    cfg["torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=2) + "\n")
    fsync_folder(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
