"""Tests for elm_jax.checkpoints.experts: fingerprints, expert files, applying experts."""

import json
import subprocess
import sys

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elm_jax.checkpoints import experts
from elm_jax.models import t5
from elm_jax.training import optimizers


def _numpy_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"encoder": {"layers_0": {"mlp": {"wo": {"kernel": rng.normal(size=(7, 5)).astype(np.float32)}}},
                      "encoder_norm": {"scale": rng.normal(size=(5,)).astype(np.float32)}},
          "token_embedder": {"embedding": rng.normal(size=(11, 5)).astype(np.float32)}}


@pytest.fixture(scope="module")
def model():
  config = t5.T5Config(vocab_size=29, d_model=16, d_kv=3, d_ff=13, num_heads=3,
                       num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
                       adapter=t5.AdapterConfig(reduction_factor=4))
  tokens = jnp.array([[3, 7, 5, 1], [4, 2, 1, 0]], jnp.int32)
  init = jax.jit(t5.T5(config).init)
  params = nn.unbox(init(jax.random.PRNGKey(1), tokens, tokens, tokens))["params"]
  return config, params, tokens


def _metadata(base, **kwargs):
  fields = dict(id="cosmos_qa.p1", kind="prompt", base_fingerprint=experts.fingerprint(base),
                trainable="adapter", task="cosmos_qa_p1", dataset="cosmos_qa", prompt="p1",
                steps=12, validation_metrics={"accuracy": 0.5})
  fields.update(kwargs)
  return experts.ExpertMetadata(**fields)


def _trained_part(params, seed=5):
  """The adapter + layer norm part of `params`, perturbed as if trained."""
  trainable, _ = optimizers.split_trainable(params, optimizers.trainable_mask(params, "adapter"))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + rng.normal(size=x.shape).astype(np.float32),
                      trainable)


# Fingerprints.


def test_fingerprint_stable_across_processes(tmp_path):
  params = _numpy_params()
  flat = experts.flatten_params(params)
  # Store in reverse order so the other process also sees another insertion order.
  np.savez(tmp_path / "p.npz", **dict(reversed(list(flat.items()))))
  code = ("import sys, numpy as np; from elm_jax.checkpoints import experts; "
          "f = dict(np.load(sys.argv[1], allow_pickle=False)); "
          "print(experts.fingerprint(experts.unflatten_params(f)))")
  other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.npz")],
                         capture_output=True, text=True, check=True,
                         env={"JAX_PLATFORMS": "cpu", "PYTHONHASHSEED": "123"})
  assert other.stdout.strip() == experts.fingerprint(params)


def test_fingerprint_ignores_params_wrapper():
  params = _numpy_params()
  assert experts.fingerprint({"params": params}) == experts.fingerprint(params)


def test_fingerprint_sees_one_value():
  params = _numpy_params()
  changed = _numpy_params()
  changed["encoder"]["encoder_norm"]["scale"][2] += 1e-6
  assert experts.fingerprint(changed) != experts.fingerprint(params)


def test_fingerprint_sees_dtype_and_name():
  params = _numpy_params()
  as_half = jax.tree.map(lambda x: x.astype(np.float16), params)
  renamed = {**params, "token_embedder": {"embedding2": params["token_embedder"]["embedding"]}}
  assert experts.fingerprint(as_half) != experts.fingerprint(params)
  assert experts.fingerprint(renamed) != experts.fingerprint(params)


def test_fingerprint_same_for_jax_and_numpy(model):
  _, params, _ = model
  assert experts.fingerprint(params) == experts.fingerprint(jax.tree.map(np.asarray, params))


# Saving and loading.


def test_save_load_round_trip(model, tmp_path):
  _, params, _ = model
  trained = _trained_part(params)
  saved = experts.save_expert(tmp_path / "e", params=trained, metadata=_metadata(params))
  metadata, loaded = experts.load_expert(tmp_path / "e", base_params=params)

  assert metadata == saved
  assert len(metadata.parameters_sha256) == 64
  assert metadata.created
  assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["expert.json", "params.safetensors"]
  flat_trained, flat_loaded = traverse_util.flatten_dict(trained), traverse_util.flatten_dict(loaded)
  assert flat_loaded.keys() == flat_trained.keys()
  for key in flat_trained:
    np.testing.assert_array_equal(flat_loaded[key], flat_trained[key])


def test_json_has_contract_fields(model, tmp_path):
  _, params, _ = model
  experts.save_expert(tmp_path / "e", params=_trained_part(params), metadata=_metadata(params))
  data = json.loads((tmp_path / "e" / "expert.json").read_text())
  for field in ("id", "kind", "task", "dataset", "prompt", "base_fingerprint", "model_config",
                "adapter", "lora", "trainable", "gin_config", "steps", "data_hash",
                "validation_metrics", "created", "train_seconds", "parameters",
                "parameters_sha256"):
    assert field in data, field


def test_safetensors_keys_are_slash_paths(model, tmp_path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  _, params, _ = model
  experts.save_expert(tmp_path / "e", params={"params": _trained_part(params)},
                      metadata=_metadata(params))
  keys = safetensors_numpy.load_file(str(tmp_path / "e" / "params.safetensors")).keys()
  assert "encoder/layers_0/mlp_adapter/down/kernel" in keys
  assert not any(k.startswith("params/") for k in keys)


def test_wrong_base_names_both_fingerprints(model, tmp_path):
  _, params, _ = model
  experts.save_expert(tmp_path / "e", params=_trained_part(params), metadata=_metadata(params))
  other_base = jax.tree.map(lambda x: x + 1, params)
  with pytest.raises(experts.BaseMismatchError) as e:
    experts.load_expert(tmp_path / "e", base_params=other_base)
  assert experts.fingerprint(params) in str(e.value)
  assert experts.fingerprint(other_base) in str(e.value)


def test_wrong_base_fingerprint_string(model, tmp_path):
  _, params, _ = model
  experts.save_expert(tmp_path / "e", params=_trained_part(params), metadata=_metadata(params))
  with pytest.raises(experts.BaseMismatchError, match="0" * 64):
    experts.load_expert(tmp_path / "e", base_fingerprint="0" * 64)


def test_corrupt_parameters_rejected(model, tmp_path):
  _, params, _ = model
  experts.save_expert(tmp_path / "e", params=_trained_part(params), metadata=_metadata(params))
  path = tmp_path / "e" / "params.safetensors"
  data = bytearray(path.read_bytes())
  data[-3] ^= 0xFF
  path.write_bytes(bytes(data))
  with pytest.raises(experts.ExpertError, match="sha256"):
    experts.load_expert(tmp_path / "e")


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", "", "..", "sp ace"])
def test_invalid_ids_rejected(model, bad_id):
  _, params, _ = model
  with pytest.raises(experts.ExpertError, match="Invalid expert id"):
    _metadata(params, id=bad_id)


def test_parameter_file_must_be_plain_name(model):
  _, params, _ = model
  with pytest.raises(experts.ExpertError, match="plain file name"):
    _metadata(params, parameters="../x.safetensors")


def test_existing_folder_needs_overwrite(model, tmp_path):
  _, params, _ = model
  experts.save_expert(tmp_path / "e", params=_trained_part(params), metadata=_metadata(params))
  with pytest.raises(experts.ExpertError, match="already exists"):
    experts.save_expert(tmp_path / "e", params=_trained_part(params), metadata=_metadata(params))
  experts.save_expert(tmp_path / "e", params=_trained_part(params, seed=9),
                      metadata=_metadata(params, steps=99), overwrite=True)
  assert experts.load_metadata(tmp_path / "e").steps == 99
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_failed_save_leaves_nothing(model, tmp_path):
  _, params, _ = model
  bad = {"a": {"kernel": np.array([object()], dtype=object)}}
  with pytest.raises(Exception):
    experts.save_expert(tmp_path / "e", params=bad, metadata=_metadata(params))
  assert list(tmp_path.iterdir()) == []


def test_missing_required_json_field(tmp_path):
  (tmp_path / "e").mkdir()
  (tmp_path / "e" / "expert.json").write_text(json.dumps({"id": "x", "kind": "prompt"}))
  with pytest.raises(experts.ExpertError, match="missing required fields"):
    experts.load_metadata(tmp_path / "e")


# Applying.


def test_apply_expert_changes_model_output(model, tmp_path):
  config, params, tokens = model
  trained = _trained_part(params)
  experts.save_expert(tmp_path / "e", params=trained, metadata=_metadata(params))
  _, loaded = experts.load_expert(tmp_path / "e", base_params=params)
  applied = experts.apply_expert(params, loaded)

  flat_applied = traverse_util.flatten_dict(applied)
  flat_base = traverse_util.flatten_dict(params)
  flat_trained = traverse_util.flatten_dict(trained)
  for key, value in flat_base.items():
    expected = flat_trained.get(key, value)
    np.testing.assert_array_equal(flat_applied[key], expected)

  apply = jax.jit(lambda p: t5.T5(config).apply({"params": p}, tokens, tokens, tokens))
  assert not np.allclose(apply(applied), apply(params))


def test_apply_keeps_params_wrapper(model):
  _, params, _ = model
  applied = experts.apply_expert({"params": params}, _trained_part(params))
  assert list(applied) == ["params"]


def test_apply_rejects_absent_key(model):
  _, params, _ = model
  with pytest.raises(experts.ExpertError, match="encoder/layers_0/extra_adapter/down/kernel"):
    experts.apply_expert(params, {"encoder": {"layers_0": {"extra_adapter": {"down": {
        "kernel": np.zeros((16, 4), np.float32)}}}}})


def test_apply_rejects_other_shape(model):
  _, params, _ = model
  with pytest.raises(experts.ExpertError, match="encoder/encoder_norm/scale"):
    experts.apply_expert(params, {"encoder": {"encoder_norm": {"scale": np.ones((17,), np.float32)}}})


def test_fingerprint_ignores_added_weights(model):
  _, params, _ = model
  without_adapters = {k: v for k, v in traverse_util.flatten_dict(params).items()
                      if not any(p.endswith("_adapter") for p in k)}
  plain = traverse_util.unflatten_dict(without_adapters)
  assert experts.fingerprint(params) == experts.fingerprint(plain)
  assert experts.fingerprint(params, include_added=True) != experts.fingerprint(plain)
