"""The report's statement on secure aggregation: what the coordinator learned, and what it did not.

With ``server.secure-aggregation`` the sites' B factors were summed with Flower's SecAgg+
(Bonawitz et al., CCS 2017; Bell et al., CCS 2020): the coordinator saw their weighted sum,
never one site's update. It still saw everything else a round carries in clear, and the
protocol assumes a coordinator that follows it (it relays the sites' public keys unsigned).
"""

from __future__ import annotations

from fedslm.common.vocabulary import Server

SERVER_LEARNS = ["the weighted sum (mean) of the sites' B factors, once per round",
                 "participation: which sites were sampled, which replied, refused, withheld or dropped out",
                 "each site's clear metrics: record count (the weight) and steps",
                 "each site's privacy record (sigma, q, steps, epsilon, status)",
                 "each site's held-out evaluation metrics (evaluation is not aggregated securely)"]
NOT_PROTECTED = ("A coordinator that deviates from the protocol (substitutes the sites' public keys, which Flower's "
                 "SecAgg+ relays unsigned, or claims a live site dropped out) or controls who takes part (Sybil "
                 "sites it runs itself, a cohort of one real site) can learn one site's update. With fewer than "
                 "3 sites in the sum, each site can subtract its own update from the mean and learn the others'. "
                 "Secure aggregation adds no DP: the released adapter is protected by each site's sample-level "
                 "DP-SGD; user-level DP would still need the server's noise.")


def secure_aggregation_doc(server: Server, rows: list[dict]) -> dict | None:
    """report.json's "secure_aggregation" (null when the run aggregated in clear); ``server``: the run's spec."""
    if not server.secure_aggregation:
        return None
    rounds = [{"round": row["round"], **row["secure_aggregation"], "skipped": bool(row.get("skipped"))}
              for row in rows if "secure_aggregation" in row]
    return {"enabled": True, "protocol": "SecAgg+ (Flower's SecAggPlusWorkflow and secaggplus_mod)",
            "server_learns": SERVER_LEARNS, "not_protected": NOT_PROTECTED, "rounds": rounds}


def secure_note(doc: dict | None) -> dict:
    """The "What is and is not protected" item."""
    if doc is None:
        return {"topic": "Secure aggregation", "text": "OFF: the coordinator saw each site's update in clear."}
    return {"topic": "Secure aggregation",
            "text": "ON: the sites' updates were summed with SecAgg+, so the coordinator saw only their sum, never "
                    "one site's update. It still learned " + "; ".join(SERVER_LEARNS[1:]) + ". " + NOT_PROTECTED}
