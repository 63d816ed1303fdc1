"""A site's two channels: the reply, which leaves, and its own log, which stays.

Why one guard around every handler: Flower's ``flwr-clientapp`` sends ``str(exception)``
of a failing ClientApp to the coordinator word for word, and exception text carries what
the failing code was looking at — a record's value, the file's column names, a record's
index, a path on the site's disk. A hostile coordinator that picks the fields, the
verbalizers or the model path reads a site's records through its errors, one request at a
time, with no ledger entry (docs/THREAT-MODEL.md). So on a deployed site ``guarded``
catches everything a handler raises: the exception and its traceback go to the site's log
(stderr, the SuperNode's log), and the reply is a ``Reason`` code with its fixed sentence
(privacy.mechanism.record), nothing else. In a simulation the researcher is the
coordinator and every site: errors travel as Flower sends them, and refusals carry their
detail.

Everything written to the site's log passes ``printable``: a coordinator-chosen string
(a run id, a field name) cannot forge log lines.
"""

from __future__ import annotations

import functools
import sys
import traceback

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.site import SITE_NAME, is_deployment
from privacy.mechanism.record import REJECTED, PrivacyRecord, Reason, refusal_text


class Refused(Exception):
    """A handler's refusal: ``reason`` leaves the site, ``detail`` stays in its log (and travels in a simulation)."""

    def __init__(self, reason: Reason, detail: str, record: PrivacyRecord | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.record = reason, detail, record


def printable(text: str) -> str:
    """``text`` on one log line: control characters (newlines, escapes) written as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def site_log(name: str, text: str) -> None:
    """The site's own log: the ClientApp's stderr, which is the SuperNode's log in a deployment."""
    print(f"[fedslm site {printable(name)}] {printable(text)}", file=sys.stderr, flush=True)


def site_name_of(node_config) -> str:
    """The node config's name when it is a valid one (a broken config still names its site), else ''."""
    name = node_config.get("name", "")
    return name if isinstance(name, str) and SITE_NAME.fullmatch(name) else ""


def refusal(msg: Message, reason: Reason, text: str, record: PrivacyRecord) -> Message:
    """The reply of a refused or failed request, train or evaluation: the privacy record and no arrays."""
    record = PrivacyRecord(**{**record.to_config(), "code": reason.value, "reason": text,
                              "status": record.status or REJECTED})
    content = RecordDict({"privacy": ConfigRecord(record.to_config()), "metrics": MetricRecord({"num-examples": 0})})
    if msg.metadata.message_type.startswith("evaluate"):
        del content["metrics"]  # an evaluation reply without metrics: the server lists it as refused
        content["info"] = ConfigRecord({"client": record.client})
    return Message(content=content, reply_to=msg)


def guarded(handler):
    """A ClientApp handler whose every failure leaves a deployed site as a reason code only."""

    @functools.wraps(handler)
    def run(msg: Message, context) -> Message:
        deployed = is_deployment(context.node_config)
        name = site_name_of(context.node_config) if deployed else ""
        try:
            return handler(msg, context)
        except Refused as refused:
            if deployed:
                site_log(name, f"refused a {msg.metadata.message_type} request: {refused.detail}")
            record = refused.record or PrivacyRecord(client=name, status=REJECTED)
            return refusal(msg, refused.reason, refusal_text(refused.reason, refused.detail, deployed), record)
        except Exception:  # noqa: BLE001 (every failure: none of its text may leave a deployed site)
            if not deployed:
                raise
            site_log(name, f"failed on a {msg.metadata.message_type} request (the coordinator got only "
                           f"'{Reason.INTERNAL.value}'):")
            for line in traceback.format_exc().splitlines():
                site_log(name, line)
            return refusal(msg, Reason.INTERNAL, Reason.INTERNAL.sentence, PrivacyRecord(client=name, status=REJECTED))

    return run
