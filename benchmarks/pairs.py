"""``key=value;key=value`` into a frozen dataclass: how sweeps name their points on one command line."""

from __future__ import annotations

from dataclasses import fields, replace

from fedslm.common.errors import UserError

_TYPES = {"int": int, "float": float, "str": str}


def parse_pairs(cls, text: str, where: str):
    """``cls()`` with the named fields replaced, each converted to its annotated type (int, float or str)."""
    known = {f.name: _TYPES[str(f.type)] for f in fields(cls)}
    point = cls()
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise UserError(f"{where}: {item!r} is not key=value with a key of {', '.join(known)}")
        try:
            point = replace(point, **{key: known[key](value.strip())})
        except ValueError:
            raise UserError(f"{where}: {key}={value.strip()!r} is not a {known[key].__name__}") from None
    return point
