"""Shipped models against the untrained base: did each file a device received keep what training gained?

A shipped file (a merged Q8_0 / Q4_0 model, or the adapter on a device's quantized base)
is only worth sending if it beats the model the device already had. The hospital demo's
Q4_0 file evaluated at 2.5069, above the untrained base's 2.5046: quantization error
larger than what three DP rounds learned. Every shipped evaluation in metrics.jsonl
("shipped" rows) is compared with round 0's eval loss (the untrained adapter, the same
held-out records); one that is worse is flagged in plain words, in the report and on
the console at shipping time. Device-base installs ("base q4_0") are the untrained base
itself, quantized: they are listed, not flagged, and are what an adapter on that base
is also compared with.
"""

from __future__ import annotations

import math


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def worse_than_base(label: str, eval_loss, base_loss) -> str | None:
    """A plain sentence when a shipped model evaluates worse than the untrained base, else None."""
    if not (_number(eval_loss) and _number(base_loss)) or eval_loss <= base_loss:
        return None
    return (f"{label}: {eval_loss:.4f}, worse than the untrained base {base_loss:.4f} — "
            "this file loses what training gained")


def compare_shipped(shipments: list[dict], round0_loss) -> tuple[list[dict], list[str]]:
    """(one row per shipped model with its change vs round 0 and vs its device base, the flags).

    ``shipments``: [{"round": k, name: {"eval_loss", "bytes", "role", ...}, ...}] as the
    report collects them from metrics.jsonl; the "fp32" entry is the adapter on the fp32
    base, for reference.
    """
    rows, flags, device_bases = [], [], {}
    for ship in shipments:
        for name, result in ship.items():
            if name == "round":
                continue
            loss, role = result.get("eval_loss"), result.get("role") or ("fp32" if name == "fp32" else "merged")
            if role == "base" and _number(loss):
                device_bases[name.removeprefix("base ")] = loss
            own_base = device_bases.get(name.removeprefix("adapter+")) if role == "adapter" else None
            flag = None if role in ("base", "fp32") else worse_than_base(name, loss, round0_loss)
            rows.append({"round": ship["round"], "model": name, "role": role, "eval_loss": loss,
                         "bytes": result.get("bytes"), "sha256": result.get("sha256"),
                         "vs_round0": loss - round0_loss if _number(loss) and _number(round0_loss) else None,
                         "vs_device_base": loss - own_base if _number(loss) and _number(own_base) else None,
                         "worse_than_base": flag is not None})
            if flag:
                flags.append(f"round {ship['round']}: {flag}")
    return rows, flags
