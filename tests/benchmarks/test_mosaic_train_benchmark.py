"""benchmarks.mosaic_train's arguments on a CPU (the timings themselves need a GPU)."""

import pytest

from benchmarks import mosaic_train


def test_shapes_parse():
  assert mosaic_train.parse_shapes("28x192,14x384") == ((28, 192), (14, 384))
  assert mosaic_train.parse_shapes("7x768") == ((7, 768),)


@pytest.mark.parametrize("text", ["28x", "28x192x3", "a,b", "0x96", ""])
def test_bad_shapes_are_named(text, capsys):
  with pytest.raises(SystemExit):
    mosaic_train.main(["--shapes", text])
  assert "expected HWxC" in capsys.readouterr().err
