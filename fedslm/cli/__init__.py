"""The ``fedslm`` command (main.py) and the commands that are not the simulation engine's."""
