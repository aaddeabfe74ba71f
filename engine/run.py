"""`python -m engine.run`: evolve an optimizer (ALR) or a learning-rate schedule (DLR).

The command lives in `engine.app.session`; this module keeps the command's name.
"""

import sys

from engine.app.session import main

if __name__ == "__main__":
    sys.exit(main())
