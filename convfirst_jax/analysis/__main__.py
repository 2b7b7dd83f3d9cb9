"""``python -m convfirst_jax.analysis --help``: see ``convfirst_jax.analysis.cli``."""

import sys

from convfirst_jax.analysis.cli import main

sys.exit(main())
