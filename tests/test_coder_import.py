"""`sparse.from`: a published coder instead of a trained one (sparsify's or SAELens's format),
checked against the model; and the training metrics TensorBoard event file of the same small run.

The SAELens folder is built by hand to the layout sae-lens 6.54 writes (`TopKSAE.save_model`:
cfg.json + sae_weights.safetensors, W_enc [d_in, d_sae]): sae-lens pulls ~40 packages
(transformer-lens, wandb, ...) that .venv does not carry. Where sae_lens is importable, the test
also writes the folder with sae-lens itself and compares with its own encoder.
"""

import json
import shutil
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from tiny_run import make_run_with_examples, nlrw

from nlrw_jax.config import load_config
from nlrw_jax.errors import UserError
from nlrw_jax.run_folder import RunFolder
from nlrw_jax.sparse import coder
from nlrw_jax.sparse.saelens_format import load_saelens
from nlrw_jax.sparse.sparsify_format import load_sparsify, save_sparsify


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small run trained by the CLI, with its examples: (config, overrides)."""
    return make_run_with_examples(tmp_path_factory)


def _error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("nlrw: error:"), proc.stderr[-2000:]
    return lines[0]


def test_export_then_import_gives_identical_examples(trained, tmp_path):
    cfg, overrides = trained
    # sparsify's folder name says the hook point: layers.N.mlp, a transcoder of layer N (checked)
    published = tmp_path / f"layers.{cfg.model.layer}.mlp"
    shutil.copytree(RunFolder(cfg.run_dir).coder, published)
    ours = [o for o in overrides if not o.startswith("run_dir=")] + [f"run_dir={tmp_path / 'imported'}",
                                                                    f"sparse.from={published}"]
    for stage in ("capture", "train", "examples"):
        nlrw(stage, "configs/tiny.yaml", *ours)
    imported = RunFolder(tmp_path / "imported")
    assert json.loads(imported.train_summary.read_text())["format"] == "sparsify"
    assert not imported.checkpoints.exists()  # nothing was trained
    with np.load(RunFolder(cfg.run_dir).examples) as a, np.load(imported.examples) as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The imported run's store carries the MLP output too: evaluate's mean-ablation baseline and the
    # coder's FVU read it (a store of mlp_in alone stopped an imported run at evaluate).
    from nlrw_jax.data.store import open_store
    from nlrw_jax.interpret.examples import StoreRows
    from nlrw_jax.rewrite.metrics import baseline_means

    store = open_store(imported.activations)
    assert store.points == ["mlp_in", "mlp_out"]
    params, meta = load_sparsify(published)
    means = baseline_means(params, meta, StoreRows(store, "mlp_in", "imported"), progress=False)
    trained_store = open_store(RunFolder(cfg.run_dir).activations)
    n = trained_store.num_tokens
    np.testing.assert_allclose(means["out"], np.asarray(trained_store.read("mlp_out", 0, n), np.float64).mean(0),
                               rtol=1e-5, atol=1e-6)


def _saelens_folder(path, params, *, k, apply_b_dec_to_input=True, rescale=False, hook="blocks.5.hook_resid_post",
                    architecture="topk"):
    """A SAELens 6 TopK SAE folder, as TopKSAE.save_model writes it."""
    path.mkdir(parents=True)
    d_sae, d_in = params["W_dec"].shape
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "hook_name": hook,
                        "model_name": "pythia-tiny"},
           "k": k, "rescale_acts_by_decoder_norm": rescale, "architecture": architecture}
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({n: np.ascontiguousarray(v, np.float32) for n, v in params.items()}, str(path / "sae_weights.safetensors"))
    return path


def _saelens_encode(p, x, k, apply_b_dec_to_input, rescale):
    """SAELens's TopKSAE.encode / decode in numpy: topk of hidden_pre, then ReLU."""
    pre = (x - p["b_dec"] * apply_b_dec_to_input) @ p["W_enc"] + p["b_enc"]
    norm = np.linalg.norm(p["W_dec"], axis=-1)
    if rescale:
        pre = pre * norm
    idx = np.argsort(-pre, axis=-1, kind="stable")[:, :k]
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    return acts, (acts / norm if rescale else acts) @ p["W_dec"] + p["b_dec"]


def _random_sae(d_in=16, n=64, seed=0):
    r = np.random.default_rng(seed)
    return {"W_enc": r.normal(size=(d_in, n)).astype(np.float32), "b_enc": r.normal(size=n).astype(np.float32) * .1,
            "W_dec": r.normal(size=(n, d_in)).astype(np.float32), "b_dec": r.normal(size=d_in).astype(np.float32)}


@pytest.mark.parametrize("apply_b_dec,rescale", [(True, False), (False, False), (False, True)])
def test_saelens_topk_encodes_the_same(tmp_path, apply_b_dec, rescale):
    p = _random_sae()
    x = np.random.default_rng(1).normal(size=(40, 16)).astype(np.float32)
    params, meta = load_saelens(_saelens_folder(tmp_path / "sae", p, k=6, apply_b_dec_to_input=apply_b_dec,
                                                rescale=rescale))
    assert (meta["kind"], meta["k"], meta["num_latents"], meta["layer"], meta["point"]) == ("sae", 6, 64, 5,
                                                                                           "resid_post")
    want_acts, want_out = _saelens_encode(p, x, 6, apply_b_dec, rescale)
    acts, idx, _ = coder.encode(params, jnp.asarray(x), 6, kind="sae")
    dense = np.zeros_like(want_acts)
    np.put_along_axis(dense, np.asarray(idx), np.asarray(acts), -1)
    np.testing.assert_allclose(dense, want_acts, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(coder.decode(params, acts, idx)), want_out, rtol=1e-4, atol=1e-4)


def test_saelens_written_by_sae_lens(tmp_path):
    """The same with the folder sae-lens itself writes and its own encoder (where it is installed)."""
    sae_lens = pytest.importorskip("sae_lens")
    import torch
    from sae_lens.saes.sae import SAEMetadata

    cfg = sae_lens.TopKSAEConfig(d_in=16, d_sae=64, k=6, apply_b_dec_to_input=False,
                                 metadata=SAEMetadata(hook_name="blocks.5.hook_resid_post"))
    sae = sae_lens.TopKSAE(cfg)
    with torch.no_grad():
        for name, v in _random_sae().items():
            getattr(sae, name).copy_(torch.from_numpy(v))
    sae.save_model(tmp_path / "sae")
    x = np.random.default_rng(1).normal(size=(40, 16)).astype(np.float32)
    with torch.no_grad():
        want = sae.encode(torch.from_numpy(x)).numpy()
    params, meta = load_saelens(tmp_path / "sae")
    acts, idx, _ = coder.encode(params, jnp.asarray(x), meta["k"], kind="sae")
    dense = np.zeros_like(want)
    np.put_along_axis(dense, np.asarray(idx), np.asarray(acts), -1)
    np.testing.assert_allclose(dense, want, rtol=1e-4, atol=1e-4)


def test_saelens_through_the_train_stage(trained, tmp_path):
    """sparse.from with a SAELens folder: the train stage records it as the run's coder."""
    from nlrw_jax.stages import train
    from nlrw_jax.stages.common import load_coder

    cfg, overrides = trained
    d = load_sparsify(RunFolder(cfg.run_dir).coder)[1]["d_in"]
    p = _random_sae(d_in=d, n=256)
    folder = _saelens_folder(tmp_path / "sae", p, k=8, hook=f"blocks.{cfg.model.layer}.hook_resid_post")
    cfg = load_config("configs/tiny.yaml", [*overrides, f"run_dir={tmp_path / 'run'}", f"sparse.from={folder}",
                                            "sparse.kind=sae"])
    assert train.run(cfg, progress=False)["format"] == "saelens"
    params, meta, _ = load_coder(cfg)
    assert (meta["kind"], meta["k"], meta["num_latents"], meta["skip"]) == ("sae", 8, 256, False)
    x = np.random.default_rng(2).normal(size=(10, d)).astype(np.float32)
    want, _ = _saelens_encode(p, x, 8, True, False)
    acts, idx, _ = coder.encode(params, jnp.asarray(x), 8, kind="sae")
    dense = np.zeros_like(want)
    np.put_along_axis(dense, np.asarray(idx), np.asarray(acts), -1)
    np.testing.assert_allclose(dense, want, rtol=1e-4, atol=1e-4)
    assert train.run(cfg, progress=False)["format"] == "saelens"  # done: the second run only reads


def test_bad_imports_are_one_line(trained, tmp_path):
    from nlrw_jax.stages.common import imported_coder

    cfg, overrides = trained
    src = RunFolder(cfg.run_dir).coder
    params, meta = load_sparsify(src)
    base = [*overrides, f"run_dir={tmp_path / 'run'}"]

    def refused(folder, *more):
        with pytest.raises(UserError) as e:
            imported_coder(load_config("configs/tiny.yaml", [*base, f"sparse.from={folder}", *more]))
        assert "\n" not in str(e.value)
        return str(e.value)

    narrow = {"W_enc": params["W_enc"][:, :8], "b_enc": params["b_enc"], "W_dec": params["W_dec"][:, :8],
              "b_dec": params["b_dec"][:8], "W_skip": params["W_skip"][:8, :8]}
    save_sparsify(narrow, tmp_path / "narrow", k=meta["k"], kind="transcoder", d_in=8,
                  num_latents=meta["num_latents"])
    assert "d_in 8" in refused(tmp_path / "narrow")
    assert "num_latents" in refused(src, "sparse.num_latents=512")
    assert "k 8" in refused(src, "sparse.k=16")
    shutil.copytree(src, tmp_path / "layers.2.mlp")
    assert "layer 2" in refused(tmp_path / "layers.2.mlp")
    (tmp_path / "empty").mkdir()
    assert "neither" in refused(tmp_path / "empty")
    with pytest.raises(UserError, match="sparse.from"):
        load_config("configs/tiny.yaml", [*base, f"sparse.from={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match="hook point"):
        imported_coder(load_config("configs/tiny.yaml", [
            *base, "sparse.kind=sae", f"sparse.from={_saelens_folder(tmp_path / 'mlp', _random_sae(d_in=meta['d_in'], n=256), k=8, hook='blocks.5.hook_mlp_out')}"]))

    # at the command line: one line, exit 2, before any work
    line = _error_line(nlrw("train", "configs/tiny.yaml", *base, f"sparse.from={src}", "sparse.kind=sae",
                            check=False))
    assert "kind 'transcoder'" in line and "sparse.kind" in line
    line = _error_line(nlrw("capture", "configs/tiny.yaml", *base, f"sparse.from={tmp_path / 'layers.2.mlp'}",
                            check=False))
    assert "layer 2" in line and "model.layer" in line
    assert not (tmp_path / "run" / "activations").exists()
    for arch, word in [("jumprelu", "not a TopK"), ("fancy", "unknown SAELens architecture")]:
        bad = _saelens_folder(tmp_path / arch, _random_sae(d_in=meta["d_in"]), k=8, architecture=arch)
        line = _error_line(nlrw("train", "configs/tiny.yaml", *base, "sparse.kind=sae", f"sparse.from={bad}",
                                check=False))
        assert word in line and arch in line


def _tfrecords(path):
    """The records of a TFRecord file (TensorBoard's event files): length, crc, data, crc."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(data[i + 12:i + 12 + n])
        i += 12 + n + 4
    return out


def test_training_metrics_in_tensorboard(trained):
    """Training wrote TensorBoard events beside metrics.jsonl: every logged number, per logged step."""
    from tensorboardX.proto.event_pb2 import Event

    cfg, _ = trained
    files = list((RunFolder(cfg.run_dir).dir("train") / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = {}
    for record in _tfrecords(files[0]):
        event = Event.FromString(record)
        for v in event.summary.value:
            scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    logged = [json.loads(line) for line in RunFolder(cfg.run_dir).metrics.read_text().splitlines()]
    for tag in ("fvu", "l0", "dead_fraction", "tokens_per_s", "ce_spliced"):
        assert f"train/{tag}" in scalars, sorted(scalars)
    for rec in logged:
        assert scalars["train/fvu"][rec["step"]] == pytest.approx(rec["fvu"], rel=1e-6)
