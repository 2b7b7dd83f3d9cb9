"""benchmarks.step_compare: several processes per implementation, alternating."""

import json

import pytest

from benchmarks import step_compare as sc


def _run(ips, b2b=None):
  return {"img_per_s": ips, "pipelined_img_per_s": b2b or ips * 1.02, "median_step_ms": 1.0}


def test_summary_uses_medians_and_flags_spread():
  results = {"xla": [_run(2158), _run(2609), _run(3836)],
             "auto": [_run(5000), _run(5100), {"impl": "auto", "error": "timed out"}]}
  s = sc.summarize(results, "xla", spread_warn=1.10)
  assert s["xla"]["median"] == 2609 and s["xla"]["best"] == 3836
  assert s["xla"]["unstable"] and not s["auto"]["unstable"]
  assert s["auto"]["failed"] == 1 and s["auto"]["median"] == 5050
  assert s["auto"]["x_median"] == pytest.approx(5050 / 2609)
  assert s["auto"]["x_best"] == pytest.approx(5100 / 3836)
  assert s["xla"]["x_median"] == 1.0
  # Every process failed: no statistics, no ratio, and none computed against it.
  s = sc.summarize({"xla": [{"error": "x"}], "auto": [_run(10)]}, "xla", 1.1)
  assert "median" not in s["xla"] and "x_median" not in s["auto"]


def test_rounds_alternate_the_order():
  assert sc.round_order(["xla", "auto"], 0) == ["xla", "auto"]
  assert sc.round_order(["xla", "auto"], 1) == ["auto", "xla"]
  assert sc.round_order(["xla", "auto"], 2) == ["xla", "auto"]


def test_cli_runs_processes_and_writes_json(tmp_path, capsys):
  out = tmp_path / "c.json"
  rc = sc.main(["--model", "convnext_atto", "--model-kwargs", '{"depths": [1, 1, 1, 1]}',
                "--batch-size", "4", "--image-size", "32", "--num-classes", "10",
                "--dtype", "float32", "--steps", "1", "--warmup", "1", "--impls", "xla",
                "--processes", "1", "--json", str(out)])
  # (One process: several are summarised by test_summary_uses_medians_and_flags_spread and
  # ordered by test_rounds_alternate_the_order; each process here costs ~16 s of CI time.)
  assert rc == 0
  text = capsys.readouterr().out
  assert "round 1/1 xla" in text and "median img/s" in text
  saved = json.loads(out.read_text())
  runs = saved["runs"]["xla"]
  assert len(runs) == 1 and all(r["img_per_s"] > 0 and r["block_impl"] == "xla" for r in runs)
  assert saved["summary"]["xla"]["x_median"] == 1.0


def test_bad_arguments_are_named(capsys):
  for argv, msg in ((["--impls", "xla,triton"], "--impls takes"),
                    (["--impls", "xla,xla"], "twice"),
                    (["--processes", "0"], "at least 1")):
    with pytest.raises(SystemExit):
      sc.main(argv)
    assert msg in capsys.readouterr().err


def test_xla_flags_value_may_start_with_a_dash(capsys):
  flag = "--xla_gpu_enable_command_buffer="
  assert sc.join_option_values(["--xla-flags", flag, "--impls", "xla"]) == [
      f"--xla-flags={flag}", "--impls", "xla"]
  assert sc.join_option_values([f"--xla-flags={flag}"]) == [f"--xla-flags={flag}"]
  assert sc.join_option_values(["--xla-flags"]) == ["--xla-flags"]
  # Both spellings parse (the run then stops at the bad --processes, before any process).
  for argv in (["--xla-flags", flag], [f"--xla-flags={flag}"]):
    with pytest.raises(SystemExit):
      sc.main([*argv, "--processes", "0"])
    err = capsys.readouterr().err
    assert "at least 1" in err and "expected one argument" not in err


def test_bad_model_kwargs_are_named(capsys):
  for value, msg in (("{depths: 1}", "--model-kwargs: not valid JSON"),
                     ("[1]", "--model-kwargs: must be a JSON object")):
    with pytest.raises(SystemExit):
      sc.main(["--model-kwargs", value])
    assert msg in capsys.readouterr().err
