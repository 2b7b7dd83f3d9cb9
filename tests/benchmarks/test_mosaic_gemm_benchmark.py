"""benchmarks.mosaic_gemm on a CPU: the interpreted smoke run checks every variant against
the float32 reference, writes its JSON and prints the table; a compiled run without a
Hopper GPU stops with the reason."""

import json

import pytest

from benchmarks import mosaic_gemm as bm


def test_smoke_run_writes_rows_and_table(tmp_path, capsys):
  out = tmp_path / "gemm.json"
  assert bm.main(["--smoke", "--json", str(out)]) == 0
  rows = json.loads(out.read_text())["rows"]
  assert [(r["kind"], r["impl"]) for r in rows] == [
      ("expand LN+GELU", "split"), ("expand LN+GELU", "gemm tn128 x2"),
      ("expand LN+GELU", "gemm tn128 x2 persistent"), ("project", "split 128 rows"),
      ("project", "gemm tn128 x2"), ("project", "gemm tn128 x2 persistent")]
  assert all("error" not in r and r["err"] < 1e-2 and r["ms"] > 0 for r in rows), rows
  printed = capsys.readouterr().out
  assert "| smoke 256x128 | project | gemm tn128 x2 |" in printed
  assert "| smoke 256x128 | project | gemm tn128 x2 persistent |" in printed


def test_compiled_run_needs_a_hopper_gpu():
  import jax
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  with pytest.raises(SystemExit, match="benchmarks.mosaic_gemm"):
    bm.main(["--batches", "1"])
