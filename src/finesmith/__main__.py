"""`python -m finesmith ...` (what `torchrun ... -m finesmith train ...` runs in every process)."""

import sys

from finesmith.cli import main

sys.exit(main())
