"""benchmarks.dwconv_wgrad on a CPU: a smoke run of the sweep in the interpreter (every
variant checked against the float32 reference), and bad arguments named."""

import json

import pytest

from benchmarks import dwconv_wgrad as bw


def test_interpreted_sweep_writes_rows_and_table(tmp_path, capsys):
  out = tmp_path / "rows.jsonl"
  rc = bw.main(["--batch", "1", "--shapes", "7x32", "--variants", "xla,tap,col",
                "--iters", "1", "--reps", "1", "--interpret", "--jsonl", str(out)])
  assert rc == 0
  header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert header["batch"] == 1 and [r["variant"] for r in rows] == ["xla", "tap", "col"]
  assert all(r["shape"] == "1x7x7x32" and r["err"] < 1e-2 and r["ms"] > 0 for r in rows)
  assert "| 1x7x7x32 |" in capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize("argv,msg", [
    (["--shapes", "56"], "expected HxC"),
    (["--variants", "xla,nope"], "unknown variant(s) ['nope']"),
])
def test_bad_arguments_are_named(argv, msg, capsys):
  with pytest.raises(SystemExit):
    bw.main(argv)
  assert msg in capsys.readouterr().err
