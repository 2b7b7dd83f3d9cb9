"""benchmarks.dispatch on CPU: every stage of a small ConvFirstNet is timed in the XLA form,
checked against the float32 reference, and the Pallas forms are reported as unsupported
with the reason (no GPU); bad arguments are refused by name."""

import json

import pytest

from benchmarks import dispatch


def test_rows_on_cpu(tmp_path, capsys):
  out = tmp_path / "rows.jsonl"
  assert dispatch.main(["--models", "convfirst_atto", "--batches", "1", "--image-size", "32",
                        "--iters", "1", "--chain", "2", "--json", str(out)]) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["stage"], r["kind"], r["shape"]) for r in rows] == [
      (1, "convfirst", [1, 8, 8, 32]), (2, "convfirst", [1, 4, 4, 64]),
      (3, "mbconv", [1, 2, 2, 128]), (4, "mbconv", [1, 1, 1, 256])]
  for r in rows:
    assert r["ms"]["xla"] > 0 and r["err"]["xla"] < 2e-2  # bf16 chain vs float32
    assert r["none_picks"] == "xla" and r["best"] == "xla" and r["none_loss"] == 0
    assert "GPU" in r["skipped"]["stage"]
    assert ("blocks" in r["skipped"]) == (r["kind"] == "convfirst")
  table = capsys.readouterr().out
  assert "| convfirst_atto | 1 | 3 (mbconv) | 2x2x128x4 |" in table
  assert "0 of 4 stages" in table


def test_bad_arguments():
  with pytest.raises(SystemExit) as e:
    dispatch.main(["--models", "convnext_tiny"])
  assert e.value.code == 2
  with pytest.raises(ValueError, match="not a ConvFirstNet"):
    dispatch.stage_shapes("convnext_tiny", 224)
  with pytest.raises(SystemExit):
    dispatch.main(["--batches", "1,x"])
  with pytest.raises(SystemExit):
    dispatch.main(["--batches", "0"])
  with pytest.raises(SystemExit):
    dispatch.main(["--image-size", "48"])
