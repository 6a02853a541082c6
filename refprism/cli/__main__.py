"""`python -m refprism.cli ...`, the same as the `refprism` command."""

import sys

from . import main

sys.exit(main())
