"""The phone scenario's data: a few lines per Shakespeare role, one role = one phone user.

``shakespeare_by_role`` (LEAF-style: one user per play::character) is the standard
stand-in for keyboard next-word prediction: many users, a few short texts each, natural
non-iid partition by user. The packaged excerpt keeps the first ``lines`` lines of every
role that has at least that many, so every client has the same small amount of data
(3 to train on and 1 held out with ``data.test-fraction`` 0.25) and a batch size of 3
fits every client. The text is public domain (Project Gutenberg via hopemcmanus/shakespeare).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from fedslm.common.jsonfiles import iter_json_lines


def build_excerpt(source: Path, out: Path, lines: int = 4) -> int:
    """Write ``{"user", "text"}`` rows for every role with >= ``lines`` lines; return the user count."""
    by_user: dict[str, list[str]] = defaultdict(list)
    for row in iter_json_lines(source, "data file"):
        by_user[row["user_id"]].append(row["text"])
    kept = {user: texts[:lines] for user, texts in by_user.items() if len(texts) >= lines}
    with out.open("w") as handle:
        for user in sorted(kept):
            for text in kept[user]:
                handle.write(json.dumps({"user": user, "text": text}) + "\n")
    return len(kept)


def first_users(source: Path, out: Path, users: int) -> int:
    """A copy of ``source`` holding only its first ``users`` users (scale runs at several sizes)."""
    seen: list[str] = []
    with out.open("w") as handle:
        for row in iter_json_lines(source, "data file"):
            if row["user"] not in seen[-1:]:
                seen.append(row["user"])
            if len(seen) > users:
                break
            handle.write(json.dumps(row) + "\n")
    return min(len(seen), users)
