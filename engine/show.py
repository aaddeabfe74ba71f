"""`python -m engine.show RUN_DIR`: a run's progress or result, read from its files.

The command lives in `engine.app.show`; this module keeps the command's name.
"""

import sys

from engine.app.show import main

if __name__ == "__main__":
    sys.exit(main())
