"""tests/deploy reuses the loopback server helpers of tests/integration (servers.py) rather than copying them."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))


@pytest.fixture
def tiny_app(tmp_path):
    """A minimal Flower app directory (pyproject + a ServerApp and a ClientApp module), as `flwr run` takes it."""
    app = tmp_path / "tinyapp"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "tinyapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "fedslm-test"\n\n'
        '[tool.flwr.app.components]\nserverapp = "tinyserver:app"\nclientapp = "tinyclient:app"\n\n'
        '[tool.flwr.app.config]\nrounds = 1\n')
    (app / "tinyserver.py").write_text("from flwr.serverapp import ServerApp\n\napp = ServerApp()\n")
    (app / "tinyclient.py").write_text("from flwr.clientapp import ClientApp\n\napp = ClientApp()\n")
    return app
