"""The Flax GPT-NeoX matches transformers' PyTorch GPT-NeoX (fp32, CPU)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from nlrw_jax.errors import UserError
from nlrw_jax.models import hf
from nlrw_jax.models.gpt_neox import GPTNeoX

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny-pythia" / "final"

CONFIGS = [
    dict(rotary_pct=0.25, use_parallel_residual=True, num_attention_heads=4),
    dict(rotary_pct=1.0, use_parallel_residual=True, num_attention_heads=2),
    dict(rotary_pct=0.25, use_parallel_residual=False, num_attention_heads=8),
    dict(rotary_pct=1.0, use_parallel_residual=False, num_attention_heads=4, hidden_act="gelu_new",
         rotary_emb_base=500.0, layer_norm_eps=1e-6),
]


def make_hf_model(tmp_path, **overrides):
    cfg = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, intermediate_size=256,
               max_position_embeddings=64, rotary_emb_base=10000.0, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(sum(map(ord, json.dumps(overrides, sort_keys=True))))
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**cfg)).eval()
    with torch.no_grad():  # random LayerNorm and biases, so a wrong mapping cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def compare(model, folder, ids, mask=None, layer=1):
    config, params = hf.load(folder)
    with torch.no_grad():
        captured = {}
        mlp = model.gpt_neox.layers[layer].mlp
        h = mlp.register_forward_hook(lambda m, i, o: captured.update(mlp_in=i[0], mlp_out=o))
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
        h.remove()
    logits, inter = GPTNeoX(config).apply({"params": params}, jnp.asarray(ids),
                                          None if mask is None else jnp.asarray(mask),
                                          capture=[(layer, "mlp_in"), (layer, "mlp_out")])
    valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    err = {
        "logits": np.abs(np.asarray(logits) - out.logits.numpy())[valid].max(),
        "mlp_in": np.abs(np.asarray(inter[(layer, "mlp_in")]) - captured["mlp_in"].numpy())[valid].max(),
        "mlp_out": np.abs(np.asarray(inter[(layer, "mlp_out")]) - captured["mlp_out"].numpy())[valid].max(),
    }
    print("max abs error", {k: float(v) for k, v in err.items()})
    return err


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_random_configs_match_transformers(tmp_path, overrides):
    model = make_hf_model(tmp_path, **overrides)
    ids = np.random.default_rng(0).integers(0, 97, size=(3, 40))
    err = compare(model, tmp_path, ids)
    assert max(err.values()) <= TOL, err


def test_padding_mask_matches_transformers(tmp_path):
    model = make_hf_model(tmp_path, num_attention_heads=4)
    ids = np.random.default_rng(1).integers(0, 97, size=(2, 24))
    mask = np.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    err = compare(model, tmp_path, ids, mask)
    assert max(err.values()) <= TOL, err


def test_save_round_trip_loads_in_transformers(tmp_path):
    model = make_hf_model(tmp_path / "src", num_attention_heads=4, use_parallel_residual=False)
    config, params = hf.load(tmp_path / "src")
    hf.save(config, params, tmp_path / "dst")
    reloaded = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "dst").eval()
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-6)


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    model = make_hf_model(tmp_path / "one", num_attention_heads=4)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _, ref = hf.load(tmp_path / "one")
    for other in ("sharded", "bin"):
        _, params = hf.load(tmp_path / other)
        jax.tree.map(np.testing.assert_array_equal, ref, params)


def test_load_onto_mesh_shards_parameters(tmp_path):
    make_hf_model(tmp_path, num_attention_heads=4)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, -1), ("data", "model"))
    _, ref = hf.load(tmp_path)
    _, params = hf.load(tmp_path, mesh=mesh)
    qkv = params["layers_0"]["attention"]["query_key_value"]["kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert len(qkv.addressable_shards) == len(jax.devices())
    assert qkv.addressable_shards[0].data.shape[1] == qkv.shape[1] // len(jax.devices())
    # vocab 97 does not divide over the devices: that axis stays whole instead of failing
    assert params["embed_in"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, None)
    jax.tree.map(np.testing.assert_array_equal, ref, params)


@pytest.mark.skipif(not (TINY / "config.json").exists(), reason="tiny Pythia not built yet")
def test_tiny_pythia_matches_transformers():
    model = transformers.GPTNeoXForCausalLM.from_pretrained(TINY, torch_dtype=torch.float32).eval()
    config = hf.read_config(TINY)
    ids = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 128))
    err = compare(model, TINY, ids, layer=config.num_hidden_layers // 2)
    assert max(err.values()) <= TOL, err


def test_bad_checkpoints(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        hf.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json is missing"):
        hf.load(tmp_path / "empty")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="expected 'gpt_neox'"):
        hf.load(llama)
    make_hf_model(tmp_path / "ok", num_attention_heads=4)
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["intermediate_size"] = 128  # disagrees with the stored tensors
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="dense_h_to_4h.weight has shape"):
        hf.load(tmp_path / "ok")
    cfg["intermediate_size"] = 256
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0}
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="default rotary"):
        hf.load(tmp_path / "ok")


def test_sequence_longer_than_positions(tmp_path):
    make_hf_model(tmp_path, num_attention_heads=4)
    config, params = hf.load(tmp_path)
    with pytest.raises(UserError, match="max_position_embeddings"):
        GPTNeoX(config).apply({"params": params}, jnp.zeros((1, 65), jnp.int32))
