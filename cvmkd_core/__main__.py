"""``python -m cvmkd_core``: the ``cvmkd`` command, as ``torchrun -m cvmkd_core run RECIPE`` starts it."""

import sys

from cvmkd_core.cli import main

sys.exit(main())
