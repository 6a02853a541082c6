"""`python -m refprism.cli ...`, the same as the `refprism` command."""

import sys

from refprism.cli import main

sys.exit(main())
