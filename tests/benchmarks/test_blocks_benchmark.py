"""benchmarks.blocks' arguments on a CPU (the timings themselves need a GPU)."""

import jax.numpy as jnp
import pytest

from benchmarks import blocks


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
