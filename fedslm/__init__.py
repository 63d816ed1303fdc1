"""fedslm's face: what a site operator and a researcher touch, on two floors of the house.

``fedslm.common`` is the ground floor every room stands on: the run config's vocabulary
(config.py), the one error a user sees (errors.py) and the JSON file helpers (jsonfiles.py).
``fedslm.cli`` is the top floor: the ``fedslm`` command and the commands it runs, above the
simulation engine, the server, the client and the privacy report. Nothing below imports it.
"""
