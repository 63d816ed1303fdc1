"""tests/deploy reuses the loopback server helpers of tests/integration (servers.py) rather than copying them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
