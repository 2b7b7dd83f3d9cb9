"""timm state-dict conversion, on synthetic state dicts (no torch needed)."""

import numpy as np
import pytest

import convfirst_jax as cj
from convfirst_jax.timm_convert import convnext_from_timm, convnext_to_timm


def _synthetic_timm_state_dict(dims=(40, 80, 160, 320), depths=(2, 2, 6, 2), classes=1000,
                               conv_mlp=True, seed=0):
  """A state dict with timm's names and torch layouts, built by hand from the spec."""
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.standard_normal(s).astype(np.float32)
  sd = {"stem.0.weight": r(dims[0], 3, 4, 4), "stem.0.bias": r(dims[0]),
        "stem.1.weight": r(dims[0]), "stem.1.bias": r(dims[0])}
  for i, (d, n) in enumerate(zip(dims, depths)):
    if i > 0:
      sd[f"stages.{i}.downsample.0.weight"] = r(dims[i - 1])
      sd[f"stages.{i}.downsample.0.bias"] = r(dims[i - 1])
      sd[f"stages.{i}.downsample.1.weight"] = r(d, dims[i - 1], 2, 2)
      sd[f"stages.{i}.downsample.1.bias"] = r(d)
    for j in range(n):
      p = f"stages.{i}.blocks.{j}"
      sd[f"{p}.conv_dw.weight"] = r(d, 1, 7, 7)
      sd[f"{p}.conv_dw.bias"] = r(d)
      sd[f"{p}.norm.weight"] = r(d)
      sd[f"{p}.norm.bias"] = r(d)
      sd[f"{p}.mlp.fc1.weight"] = r(4 * d, d, 1, 1) if conv_mlp else r(4 * d, d)
      sd[f"{p}.mlp.fc1.bias"] = r(4 * d)
      sd[f"{p}.mlp.fc2.weight"] = r(d, 4 * d, 1, 1) if conv_mlp else r(d, 4 * d)
      sd[f"{p}.mlp.fc2.bias"] = r(d)
      sd[f"{p}.gamma"] = r(d)
  sd.update({"head.norm.weight": r(dims[-1]), "head.norm.bias": r(dims[-1]),
             "head.fc.weight": r(classes, dims[-1]), "head.fc.bias": r(classes)})
  return sd


def test_from_timm_places_every_tensor_with_the_right_layout():
  sd = _synthetic_timm_state_dict()
  model = convnext_from_timm(sd, cj.create_model("convnext_atto", rngs=0))
  blk = model.stages[1].blocks[1]
  np.testing.assert_array_equal(blk.conv_dw.kernel[...][:, :, 0, 5],
                                sd["stages.1.blocks.1.conv_dw.weight"][5, 0])
  np.testing.assert_array_equal(blk.mlp.fc1.kernel[...],
                                sd["stages.1.blocks.1.mlp.fc1.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(model.stages[2].downsample[1].kernel[...][1, 0, 3, 7],
                                sd["stages.2.downsample.1.weight"][7, 3, 1, 0])
  np.testing.assert_array_equal(model.stem[0].kernel[...][2, 3, 1, 4],
                                sd["stem.0.weight"][4, 1, 2, 3])
  np.testing.assert_array_equal(model.head.fc.kernel[...], sd["head.fc.weight"].T)
  np.testing.assert_array_equal(blk.gamma[...], sd["stages.1.blocks.1.gamma"])


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_round_trip(conv_mlp):
  sd = _synthetic_timm_state_dict(conv_mlp=conv_mlp, seed=1)
  model = convnext_from_timm(sd, cj.create_model("convnext_atto", rngs=0))
  back = convnext_to_timm(model, conv_mlp=conv_mlp)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_errors_name_the_keys():
  sd = _synthetic_timm_state_dict()
  model = cj.create_model("convnext_atto", rngs=0)
  missing = dict(sd)
  del missing["stages.0.blocks.1.gamma"]
  with pytest.raises(ValueError, match="lacks 1 parameters.*stages.0.blocks.1.gamma"):
    convnext_from_timm(missing, model)
  extra = dict(sd, **{"stages.0.blocks.9.gamma": np.zeros(40, np.float32)})
  with pytest.raises(ValueError, match="stages.0.blocks.9.gamma"):
    convnext_from_timm(extra, model)
  convnext_from_timm(extra, model, strict=False)
  with pytest.raises(ValueError, match=r"head.fc.weight: shape \(384, 1000\).*\(320, 1000\)"):
    convnext_from_timm(_synthetic_timm_state_dict(dims=(48, 96, 192, 384)), model)
