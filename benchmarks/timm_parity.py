"""Logit parity with timm: same random weights in timm's ConvNeXt and ours, float32.

Needs torch and timm (present on the GPU image; not a dependency of the library):

    PYTHONPATH=. python3 -m benchmarks.timm_parity --model convnext_tiny --json out.json

timm runs on the CPU in float32; ours runs on the default JAX backend with float32
matmuls at "highest" precision (no TF32), so the difference measures the conversion and
the model definition, not the precision mode.  The same comparison at JAX's default GPU
precision is printed too.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import convfirst_jax as cj
from convfirst_jax.timm_convert import convnext_from_timm


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="convnext_tiny")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  try:
    import timm
    import torch
  except ImportError as e:
    print(f"error: timm parity needs torch and timm installed ({e})", file=sys.stderr)
    return 2

  torch.manual_seed(args.seed)
  tm = timm.create_model(args.model, pretrained=False, num_classes=1000).eval()
  # timm initialises layer scale to 1e-6, which hides the blocks: use random weights
  # everywhere so that every parameter influences the logits.
  with torch.no_grad():
    for name, prm in tm.named_parameters():
      prm.copy_(torch.randn_like(prm) * (0.5 if name.endswith("gamma") else 0.05))
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  ours = convnext_from_timm(sd, cj.create_model(args.model, num_classes=1000, rngs=0))
  ours.eval()

  rng = np.random.default_rng(args.seed)
  x = rng.standard_normal((args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy().astype(np.float64)

  results = {"model": args.model, "batch": args.batch, "image_size": args.image_size,
             "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
             "timm_version": timm.__version__, "torch_version": torch.__version__,
             "logit_scale": float(np.abs(ref).max())}
  for precision in ("highest", "default"):
    with jax.default_matmul_precision(precision):
      fn = jax.jit(lambda m, x: m(x))
      out = np.asarray(fn(ours, jnp.asarray(x)), np.float64)
    err = np.abs(out - ref)
    results[precision] = {
        "max_abs_err": float(err.max()),
        "rel_l2_err": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        "argmax_agree": float(np.mean(out.argmax(-1) == ref.argmax(-1))),
    }
  print(json.dumps(results, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
