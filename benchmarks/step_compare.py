r"""Training-step throughput of several ``--block-impl`` choices, each in several fresh
processes, alternating -- the comparison to run on your own GPU.

    python -m benchmarks.step_compare --model convnext_tiny --batch-size 256 \
        --impls xla,auto --processes 3 [--json out.json]

Why processes: on Hopper, XLA's own training step is bimodal between processes with its
default CUDA-graph command buffers (ConvNeXt-T, batch 128, one H100, 2026-11-27: 59.3, 49.1
and 33.4 ms per step in three processes; 34.2, 33.6 and 34.3 ms with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=``), so one process per implementation can
overstate a speed-up by 1.8x.  The flag is not neutral on every GPU: on an H200
(2026-11-28, batch 256, one process each) XLA's step took 75.0 ms with it and 54.2 ms
without, so compare with several processes at the defaults first.  Each round runs every
implementation once (``python -m train.throughput`` in a subprocess, same flags), the
order reversed every other round so that slow drift (clocks, temperature) does not favour
one side.  Reported per implementation: each process's synchronised img/s, the median and
the best, and the spread (best / worst); ratios against the first implementation use the
medians (and the bests).  A spread above ``--spread-warn`` is flagged: compare with more
processes (or, on an H100, with the flag above).  Extra ``XLA_FLAGS`` for every process:
``--xla-flags``, e.g.

    python -m benchmarks.step_compare --impls xla,auto \
        --xla-flags=--xla_gpu_enable_command_buffer=

(``--xla-flags VALUE`` with a space works too, although VALUE starts with '-').  Exit
status 1 if any process failed (its error is printed; the statistics leave it out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Options whose values start with '-' (XLA flags): argparse would take "--xla-flags
# --xla_foo=1" for an option without its value, so ``join_option_values`` rewrites it as
# "--xla-flags=--xla_foo=1" first.
_DASH_VALUE_OPTIONS = ("--xla-flags",)


def join_option_values(argv: list[str]) -> list[str]:
  """``argv`` with every ``--xla-flags VALUE`` pair joined into ``--xla-flags=VALUE``."""
  out, i = [], 0
  while i < len(argv):
    if argv[i] in _DASH_VALUE_OPTIONS and i + 1 < len(argv):
      out.append(f"{argv[i]}={argv[i + 1]}")
      i += 2
    else:
      out.append(argv[i])
      i += 1
  return out


def json_object(text: str) -> dict:
  """argparse type of ``--model-kwargs``: a JSON object (as train.cli.json_object; not
  imported from there so that this driver does not import jax)."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise argparse.ArgumentTypeError(f"not valid JSON: {e}: {text!r}") from None
  if not isinstance(value, dict):
    raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
  return value


def round_order(impls: list[str], round_index: int) -> list[str]:
  """The implementations in round ``round_index``'s order (reversed every other round)."""
  return list(impls) if round_index % 2 == 0 else list(reversed(impls))


def summarize(results: dict[str, list[dict]], baseline: str, spread_warn: float) -> dict:
  """Per implementation: the processes' img/s, median, best, spread; ratios of medians and
  of bests against ``baseline``.  ``results[impl]``: train.throughput's result dicts (a
  failed process is a dict with "error" and no "img_per_s")."""
  out = {}
  for impl, runs in results.items():
    ips = [r["img_per_s"] for r in runs if "img_per_s" in r]
    row = {"img_per_s": ips, "failed": sum("img_per_s" not in r for r in runs)}
    if ips:
      row.update(median=statistics.median(ips), best=max(ips), spread=max(ips) / min(ips),
                 back_to_back_median=statistics.median(
                     r["pipelined_img_per_s"] for r in runs if "img_per_s" in r))
      row["unstable"] = row["spread"] > spread_warn
    out[impl] = row
  base = out.get(baseline, {})
  for impl, row in out.items():
    if "median" in row and "median" in base:
      row["x_median"] = row["median"] / base["median"]
      row["x_best"] = row["best"] / base["best"]
  return out


def _run_one(impl: str, args, out_json: Path) -> dict:
  cmd = [sys.executable, "-m", "train.throughput", "--model", args.model,
         "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
         "--block-impl", impl, "--dtype", args.dtype, "--steps", str(args.steps),
         "--warmup", str(args.warmup), "--num-classes", str(args.num_classes),
         "--json", str(out_json)]
  if args.num_devices is not None:
    cmd += ["--num-devices", str(args.num_devices)]
  if args.model_kwargs:
    cmd += ["--model-kwargs", json.dumps(args.model_kwargs)]
  env = dict(os.environ)
  if args.xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return {"impl": impl, "error": f"timed out after {args.timeout} s"}
  if proc.returncode != 0 or not out_json.exists():
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"impl": impl, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
  r = json.loads(out_json.read_text())
  r["process_s"] = time.perf_counter() - t0
  return r


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.step_compare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="convnext_tiny")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--impls", default="xla,auto",
                 help="comma-separated --block-impl values; ratios are against the first")
  p.add_argument("--processes", type=int, default=3, help="processes per implementation")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=4)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--num-devices", type=int, default=None)
  p.add_argument("--model-kwargs", type=json_object, default={},
                 help='more create_model arguments as a JSON object, e.g. '
                 '\'{"depths": [1, 1, 2, 1]}\'')
  p.add_argument("--xla-flags", default="",
                 help="appended to XLA_FLAGS for every process (example above: "
                 "--xla-flags=VALUE or --xla-flags VALUE)")
  p.add_argument("--timeout", type=float, default=600, help="seconds per process")
  p.add_argument("--spread-warn", type=float, default=1.10,
                 help="flag an implementation whose best / worst process exceeds this")
  p.add_argument("--json", default=None)
  a = p.parse_args(join_option_values(sys.argv[1:] if argv is None else list(argv)))
  impls = [s for s in a.impls.split(",") if s]
  bad = [s for s in impls if s not in ("xla", "auto", "pallas")]
  if bad or not impls:
    p.error(f"--impls takes xla, auto and pallas, got {a.impls!r}")
  if len(set(impls)) != len(impls):
    p.error(f"--impls lists an implementation twice: {a.impls!r}")
  if a.processes < 1:
    p.error(f"--processes must be at least 1, got {a.processes}")

  results: dict[str, list[dict]] = {impl: [] for impl in impls}
  with tempfile.TemporaryDirectory() as d:
    for i in range(a.processes):
      for impl in round_order(impls, i):
        r = _run_one(impl, a, Path(d) / f"{impl}_{i}.json")
        results[impl].append(r)
        msg = (f"{r['img_per_s']:.0f} img/s ({r['median_step_ms']:.2f} ms per step)"
               if "img_per_s" in r else f"FAILED: {r['error']}")
        print(f"round {i + 1}/{a.processes} {impl:<6} {msg}", flush=True)
  summary = summarize(results, impls[0], a.spread_warn)

  print(f"\n{a.model}, batch {a.batch_size}, {a.image_size}x{a.image_size}, {a.dtype}, "
        f"{a.processes} process(es) per implementation"
        + (f", XLA_FLAGS += {a.xla_flags!r}" if a.xla_flags else ""))
  print(f"{'impl':<7} {'median img/s':>13} {'best':>8} {'spread':>7} {'x median':>9} "
        f"{'x best':>7}  processes")
  for impl in impls:
    s = summary[impl]
    if "median" not in s:
      print(f"{impl:<7} every process failed")
      continue
    print(f"{impl:<7} {s['median']:>13.0f} {s['best']:>8.0f} {s['spread']:>7.2f} "
          f"{s.get('x_median', float('nan')):>9.2f} {s.get('x_best', float('nan')):>7.2f}  "
          + ", ".join(f"{v:.0f}" for v in s["img_per_s"])
          + (f"  ({s['failed']} failed)" if s["failed"] else ""))
  unstable = [impl for impl in impls if summary[impl].get("unstable")]
  if unstable:
    print(f"\nwarning: {', '.join(unstable)} varied by more than {a.spread_warn:.2f}x between "
          f"processes; XLA's default command buffers can do that on Hopper -- run more "
          f"processes (--xla-flags=--xla_gpu_enable_command_buffer= steadied XLA on an "
          f"H100 but slowed it on an H200)")
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"args": {k: v for k, v in vars(a).items() if k != "json"},
                 "summary": summary, "runs": results}, f, indent=2)
  failed = sum(s["failed"] for s in summary.values())
  if failed:
    print(f"\n{failed} process(es) failed (above); the statistics leave them out")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
