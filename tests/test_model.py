"""Capture points and structural replacements of the Flax GPT-NeoX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlrw_jax.errors import UserError
from nlrw_jax.models.gpt_neox import GPTNeoX, GPTNeoXConfig, init_params

CFG = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=32)


@pytest.fixture(scope="module")
def setup():
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 64)
    return GPTNeoX(CFG), init_params(CFG, seed=3), ids


def test_identity_replacement_changes_nothing(setup):
    model, params, ids = setup
    ref, _ = model.apply({"params": params}, ids)
    out, _ = model.apply({"params": params}, ids, mlp_replacements={1: lambda x, mlp: mlp(x)},
                         resid_replacements={2: lambda r: r})
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(out))


def test_replacement_sees_mlp_in_and_its_output_is_used(setup):
    model, params, ids = setup
    points = [(1, n) for n in ("resid_pre", "mlp_in", "mlp_out", "resid_post")]
    _, clean = model.apply({"params": params}, ids, capture=points)
    seen = {}

    def zero_mlp(x, mlp):
        seen["x"] = x
        return jnp.zeros_like(x)

    _, ablated = model.apply({"params": params}, ids, mlp_replacements={1: zero_mlp}, capture=points)
    np.testing.assert_array_equal(np.asarray(seen["x"]), np.asarray(clean[(1, "mlp_in")]))
    assert float(jnp.abs(ablated[(1, "mlp_out")]).max()) == 0.0
    # parallel residual: out = resid_pre + attn + mlp, so removing the MLP subtracts exactly mlp_out
    np.testing.assert_allclose(np.asarray(ablated[(1, "resid_post")]),
                               np.asarray(clean[(1, "resid_post")] - clean[(1, "mlp_out")]), atol=1e-5)


def test_last_layer_capture_equals_full_forward(setup):
    model, params, ids = setup
    _, full = model.apply({"params": params}, ids, capture=[(1, "mlp_out")])
    logits, early = model.apply({"params": params}, ids, capture=[(1, "mlp_out")], last_layer=1)
    assert logits is None
    np.testing.assert_array_equal(np.asarray(full[(1, "mlp_out")]), np.asarray(early[(1, "mlp_out")]))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_compute_is_close(setup, dtype):
    model, params, ids = setup
    ref, _ = model.apply({"params": params}, ids)
    out, _ = GPTNeoX(CFG, dtype=dtype).apply({"params": params}, ids)
    assert out.dtype == dtype
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.1


def test_bad_layer_and_capture_name(setup):
    model, params, ids = setup
    with pytest.raises(UserError, match="layer 3 is out of range"):
        model.apply({"params": params}, ids, capture=[(3, "mlp_in")])
    with pytest.raises(UserError, match="unknown capture point"):
        model.apply({"params": params}, ids, capture=[(0, "attn")])
