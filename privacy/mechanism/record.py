"""What a site says about its privacy in a reply: one typed record, and a closed list of reasons.

Why a closed list. Anything a site sends is seen by the coordinator, and a refusal's text
used to be whatever the code that refused wrote: exception text that named columns, label
values, record indexes and paths on the site's disk. So a deployed site refuses with a
``Reason`` code and that code's fixed sentence, nothing else; the details go to its own
log (client.outbound). A simulation (the researcher is coordinator and every site) says
the detail instead, as before (the code is in the record either way).

The record itself is public by design: it is the site's accounting (sigma, q, steps,
delta, epsilon and the record count, docs/THREAT-MODEL.md). Client, server and report read
and write it through ``PrivacyRecord`` so that a field means the same everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum


class Reason(str, Enum):
    """Why a site did not do what it was asked. The only refusal vocabulary that leaves a site."""

    BUDGET = "budget"
    OUT_OF_BOUNDS = "request-out-of-bounds"
    DATA_CHANGED = "data-changed"
    EVALUATION_OFF = "evaluation-off"
    INTERNAL = "internal-error"

    @property
    def sentence(self) -> str:
        return SENTENCES[self]


SENTENCES = {
    Reason.BUDGET: "the site's privacy budget does not admit this round",
    Reason.OUT_OF_BOUNDS: "the request is outside the site's policy",
    Reason.DATA_CHANGED: "the site's records changed; its operator must confirm them before it trains again",
    Reason.EVALUATION_OFF: "the site does not answer this evaluation request",
    Reason.INTERNAL: "the site could not complete the request; its own log says why",
}

# status: what happened to the request. Only "committed" (and "no-dp" in a simulation without DP) released anything.
COMMITTED, RESERVED, REFUSED, REJECTED, NO_DP = "committed", "reserved", "refused", "rejected", "no-dp"
NOT_TRAINED = (REFUSED, REJECTED)  # refused: recorded in the ledger, spends nothing; rejected: ledger untouched
NOISE_GENERATOR = "chacha20"  # privacy.mechanism.randomness; records without the field predate it (Mersenne Twister)


@dataclass(frozen=True)
class PrivacyRecord:
    """One reply's privacy record (a train round, a refusal, or a DP evaluation)."""

    client: str
    status: str
    dp: bool = True
    noise_seed: str = "os-entropy"
    noise_generator: str = NOISE_GENERATOR
    code: str = ""  # a Reason value when the site refused or failed
    reason: str = ""  # the code's sentence (+ the detail, in a simulation)
    mechanism: str = "dp-sgd"  # dp-sgd | dp-evaluation
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    delta: float = 0.0
    epsilon: float = 0.0
    epsilon_rdp: float = 0.0
    max_epsilon: float = 0.0
    accountant: str = "prv"
    sampling: str = "poisson"
    records: int = 0
    unit: str = "record"  # whom the guarantee protects: "record", or the site's word for a unit ("patient")
    records_per_unit: int = 1  # unit-level: most records of one unit in one step (k)
    units: int = 0  # unit-level: how many units trained (the sample rate's denominator; released as q is)
    group_records: int = 0  # a SIMULATED record-level site with dp.group-field: most records of one person
    deployed: bool = False  # a deployed site: it trained on its own file (node config), not the run config's data

    def to_config(self) -> dict:
        """For a Flower ConfigRecord (every value a str, bool, int or float)."""
        return asdict(self)

    @classmethod
    def from_config(cls, record) -> "PrivacyRecord":
        """From a reply's ConfigRecord; unknown fields (a newer site) are ignored, missing ones default."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(record).items() if k in known})

    @property
    def trained(self) -> bool:
        return self.status not in NOT_TRAINED


def refusal_text(reason: Reason, detail: str, deployed: bool) -> str:
    """What a refusal says on the wire: a deployed site's fixed sentence; a simulated site's detail."""
    return reason.sentence if deployed or not detail else detail
