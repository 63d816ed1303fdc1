"""``python -m fedslm``: the ``fedslm`` command without its console script (tests, CI)."""

import sys

from fedslm.cli.main import main

sys.exit(main())
