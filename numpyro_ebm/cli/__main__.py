"""``python -m numpyro_ebm.cli``: the ``numpyro-ebm`` command."""

import sys

from numpyro_ebm.cli import main

sys.exit(main())
