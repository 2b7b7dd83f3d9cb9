"""benchmarks.blocks' arguments on a CPU (the timings themselves need a GPU)."""

import jax.numpy as jnp
import pytest

from benchmarks import blocks, ceilings


def test_convnext_impl_is_checked_and_recorded_choices():
  with pytest.raises(ValueError, match="impl must be 'auto' or 'pallas'"):
    blocks.convnext_cases(1, jnp.bfloat16, impl="triton")
  cases = blocks.convnext_cases(1, jnp.bfloat16)  # default: implementation=None
  assert [c.name for c in cases] == ["convnext 56x56x96", "convnext 28x28x192",
                                     "convnext 14x14x384", "convnext 7x7x768"]
  assert set(cases[0].impls) == {"xla", "pallas"}


@pytest.mark.parametrize("argv,msg", [
    (["--convnext-impl", "triton"], "invalid choice: 'triton'"),
    (["--blocks", "resnet"], "unknown --blocks ['resnet']"),
])
def test_bad_arguments_are_named(argv, msg, capsys):
  with pytest.raises(SystemExit):
    blocks.main(argv)
  assert msg in capsys.readouterr().err


def test_ceilings_follow_the_device():
  """--ceilings: the H100 constants on request and (as a named stand-in) without a GPU,
  measured values otherwise; an unknown mode is named."""
  assert ceilings.resolve("h100") == ceilings.H100
  auto = ceilings.resolve("auto")
  assert (auto.flops, auto.bytes_per_s) == (ceilings.H100.flops, ceilings.H100.bytes_per_s)
  assert "no GPU here" in auto.source
  measured = ceilings.resolve("measure", matmul_size=64, copy_bytes=1 << 16)
  assert measured.flops > 0 and measured.bytes_per_s > 0
  assert measured.flops != ceilings.H100.flops and "measured on this" in measured.source
  assert measured.floor_s(2e9, 0) == 2e9 / measured.flops
  assert "TFLOP/s" in measured.describe()
  with pytest.raises(ValueError, match="ceilings must be one of"):
    ceilings.resolve("a100")


def test_floor_uses_the_resolved_ceilings(monkeypatch):
  case = blocks.convnext_cases(1, jnp.bfloat16)[0]
  slow = ceilings.Ceilings(ceilings.H100.flops / 2, ceilings.H100.bytes_per_s / 2, "half")
  base = case.floor_ms(True)
  monkeypatch.setattr(blocks, "CEILINGS", slow)
  assert case.floor_ms(True) == pytest.approx(2 * base)
