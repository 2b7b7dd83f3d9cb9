r"""The depthwise conv's kernel gradient: XLA's against the Pallas-Triton kernels' forms.

    PYTHONPATH=. python3 -m benchmarks.dwconv_wgrad [--batch 128] [--shapes 56x96,14x384] \
        [--variants xla,tap,onepass_s14_i4,col_s7_r14] [--jsonl out.jsonl]

For each shape (H = W, C; 7x7 kernel, bfloat16 x and dy) and variant this checks the
kernel gradient against a float32 XLA reference (max |a - ref| / max |ref|) and times it
(median of ``--iters`` samples of ``--reps`` back-to-back calls alternating two random
input sets, synchronised).  XLA's own kernel gradient (autodiff of the conv) runs in the
same process.  Each result line is printed and appended to ``--jsonl`` as soon as it is
measured, with the variant's compile time: Triton's compile time grows with the unrolled
code (the column walk unrolled 7 columns per iteration took ~2 minutes for one variant on
the H100 machine, 2026-11-27, and a sweep that buffered its output lost everything when its
time ran out).  The table comes last.

Variants (``VARIANTS``): ``xla``; ``tap`` (``_wgrad_kernel``, default tiles);
``onepass_*`` (``_wgrad_one_pass_kernel``: strip s, images i); ``col`` (the column walk
``_wgrad_columns_kernel`` with its default tiles); ``col_*`` (strip s, rows r per program,
channel block c (else 128), unroll u; ``_p``: loads one column ahead, else not).
``--interpret`` runs the Pallas kernels in the interpreter (a CPU smoke run at small
shapes; its times mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.convnext_block import dwconv_triton as dt
from pallas_kernels.timing import median_ms

K = 7
SHAPES = "56x96,28x192,14x384,7x768"
_COL = dict(columns=True, cblock=128, prefetch=False)  # the first column-walk form timed
VARIANTS = {
    "tap": dt.WgradTiles(),
    "onepass_s14_i4": dt.WgradTiles(one_pass=True, strip=14, images=4),
    # the column walk, default tiles (strip 7, 14 rows, 64 / 128 channels, loads prefetched)
    "col": dt.WgradTiles(columns=True),
    # 128 channels per program, loads not prefetched unless ``_p`` (H100 2026-11-27 runs)
    "col_s7_r14": dt.WgradTiles(**_COL, strip=7, rows=14),
    "col_s7_r7": dt.WgradTiles(**_COL, strip=7, rows=7),
    "col_s7_r28": dt.WgradTiles(**_COL, strip=7, rows=28),
    "col_s4_r8": dt.WgradTiles(**_COL, strip=4, rows=8),
    "col_s7_r14_c32": dt.WgradTiles(**dict(_COL, cblock=32), strip=7, rows=14),
    "col_s7_r14_u2": dt.WgradTiles(**_COL, strip=7, rows=14, unroll=2),
    "col_s7_r14_p": dt.WgradTiles(**dict(_COL, prefetch=True), strip=7, rows=14),
    "col_s7_r28_p": dt.WgradTiles(**dict(_COL, prefetch=True), strip=7, rows=28),
    "col_s7_r14_c64_p": dt.WgradTiles(columns=True, strip=7, rows=14, cblock=64, prefetch=True),
    "col_s4_r8_p": dt.WgradTiles(**dict(_COL, prefetch=True), strip=4, rows=8),
}
DEFAULT_VARIANTS = "xla,tap,col,col_s7_r14_p,col_s7_r14"


def xla_wgrad(x, dy):
  """XLA's kernel gradient of the "same" depthwise conv: autodiff of the conv (float32)."""
  c = x.shape[-1]

  def conv(w):
    return jax.lax.conv_general_dilated(
        x, w.reshape(K, K, 1, c).astype(x.dtype), (1, 1), ((K // 2, K // 2),) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)

  _, vjp = jax.vjp(conv, jnp.zeros((K, K, c), jnp.float32))
  return vjp(dy)[0]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def parse_shapes(text: str) -> list[tuple[int, int]]:
  try:
    shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]
  except ValueError:
    shapes = []
  if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
    raise argparse.ArgumentTypeError(f"expected HxC[,HxC...] (e.g. 56x96), got {text!r}")
  return shapes


def parse_variants(text: str) -> list[str]:
  names = [v for v in text.split(",") if v]
  bad = [v for v in names if v != "xla" and v not in VARIANTS]
  if bad or not names:
    raise argparse.ArgumentTypeError(
        f"unknown variant(s) {bad or text!r}; known: xla, {', '.join(VARIANTS)}")
  return names


def run(batch, shapes, variants, iters, reps, interpret=False, jsonl=None):
  """Measure every (shape, variant); returns the result rows (also printed / appended)."""
  rows = []
  for hw, c in shapes:
    key = jax.random.key(hw * 10_000 + c)
    sets = []
    for _ in range(2):
      k1, k2, key = jax.random.split(key, 3)
      sets.append(tuple(jax.random.normal(k, (batch, hw, hw, c), jnp.bfloat16)
                        for k in (k1, k2)))
    x, g = sets[0]
    ref = xla_wgrad(x.astype(jnp.float32), g.astype(jnp.float32))
    for name in variants:
      if name == "xla":
        fn = jax.jit(xla_wgrad)
      else:
        fn = jax.jit(lambda a, b, t=VARIANTS[name]: dt.depthwise_conv_wgrad(
            a, b, K, tiles=t, interpret=interpret))
      row = {"shape": f"{batch}x{hw}x{hw}x{c}", "variant": name}
      try:
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(x, g))
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        row["err"] = _rel(out, ref)
        row["ms"] = median_ms(fn, sets, iters=iters, reps=reps)
      except Exception as e:  # noqa: BLE001 - one variant's failure is a result of the sweep
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(json.dumps(row), flush=True)
      if jsonl:
        with open(jsonl, "a") as f:
          f.write(json.dumps(row) + "\n")
      rows.append(row)
  return rows


def table(rows, variants) -> str:
  shapes = list(dict.fromkeys(r["shape"] for r in rows))
  cell = {(r["shape"], r["variant"]): r for r in rows}
  lines = ["| shape | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
  for s in shapes:
    vals = []
    for v in variants:
      r = cell.get((s, v), {})
      vals.append(f"{r['ms']:.3f} ({r['err']:.0e})" if "ms" in r else "fail" if r else "")
    lines.append(f"| {s} | " + " | ".join(vals) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.dwconv_wgrad", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--shapes", type=parse_shapes, default=parse_shapes(SHAPES),
                 help=f"HxC list (H = W), default {SHAPES}")
  p.add_argument("--variants", type=parse_variants, default=parse_variants(DEFAULT_VARIANTS),
                 help=f"comma list, default {DEFAULT_VARIANTS}")
  p.add_argument("--iters", type=int, default=15)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--interpret", action="store_true",
                 help="Pallas kernels in the interpreter (CPU smoke run)")
  p.add_argument("--jsonl", default=None, help="append a header and one line per result")
  a = p.parse_args(argv)
  if a.jsonl:
    with open(a.jsonl, "a") as f:
      f.write(json.dumps({"device": jax.devices()[0].device_kind, "batch": a.batch,
                          "date": datetime.datetime.now(datetime.UTC).isoformat(
                              timespec="minutes")}) + "\n")
  rows = run(a.batch, a.shapes, a.variants, a.iters, a.reps, a.interpret, a.jsonl)
  print(f"\n{jax.devices()[0].device_kind}, batch {a.batch}, bf16, 7x7 kernel gradient, ms "
        "(max-abs error vs float32 XLA)")
  print(table(rows, a.variants))
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  raise SystemExit(main())
