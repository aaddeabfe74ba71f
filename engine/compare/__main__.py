"""`python -m engine.compare`: tune and compare optimizers on held-out tasks (see
`engine.compare.tuning`)."""

import sys

from engine.compare.cli import main

sys.exit(main())
