"""`python -m engine.compare`: tune and compare optimizers on held-out tasks (see
`engine.compare.comparison`)."""

import sys

from engine.compare.comparison import main

sys.exit(main())
