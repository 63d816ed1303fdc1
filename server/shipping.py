"""Shipping as a step of the run: what the round loop calls, not a branch inside it.

After a trained round every ``ship.every`` rounds (before the last), and once after the
last trained round, the round's files are exported (server.ship builds them: ship.kind,
ship.quantizations), sent to every evaluating client and evaluated there; the results go
into metrics.jsonl as a ``shipped`` row. Nothing is shipped when ship.quantizations is empty.
"""

from __future__ import annotations

from fedslm.common.vocabulary import RunConfig
from server.console import say
from server.exchange import send_and_receive
from server.rundir import RunDir
from server.ship import parse_quants, plan_shipments, round0_eval_loss, ship_messages, shipping_warning


class ShippingStep:
    def __init__(self, grid, specs: RunConfig, rundir: RunDir, base_cfg: dict, timeout: float, evaluate):
        """``evaluate(server_round, nodes, replies, label)``: the round loop's summary of evaluation replies."""
        self.grid, self.specs, self.rundir, self.base_cfg = grid, specs, rundir, base_cfg
        self.timeout, self.evaluate = timeout, evaluate
        self.last_trained, self.last_eval = 0, {}

    @property
    def enabled(self) -> bool:
        return bool(parse_quants(self.specs.ship.quantizations))

    def after_round(self, server_round: int, nodes, row: dict, trained: bool, rounds: int) -> None:
        """A trained round is remembered (the run ships the last one) and shipped every ship.every rounds."""
        if not trained:
            return
        self.last_trained, self.last_eval = server_round, row
        every = self.specs.ship.every
        if every and server_round % every == 0 and server_round < rounds:
            self.ship(server_round, nodes, row)

    def at_end(self, nodes) -> None:
        if self.last_trained:
            self.ship(self.last_trained, nodes, self.last_eval)

    def ship(self, server_round: int, nodes, fp32: dict) -> None:
        """Export this round's files, ship each to every client, record their evaluations."""
        if not self.enabled:
            return
        shipments = plan_shipments(self.rundir.path, self.specs, server_round,
                                   eval_metrics={"eval_loss": fp32.get("eval_loss")})
        results = {"fp32": {k: fp32[k] for k in ("eval_loss", "eval_clients", "accuracy") if k in fp32}}
        untrained = round0_eval_loss(self.rundir.path)
        for shipment in shipments:
            messages = ship_messages(shipment, nodes, {**self.base_cfg, "server-round": server_round})
            replies = send_and_receive(self.grid, messages, timeout=self.timeout,
                                       what=f"round {server_round} shipping {shipment.label}", say=say)
            summary = self.evaluate(server_round, nodes, replies=replies, label=f"shipped {shipment.label} eval")
            results[shipment.label] = {**summary, **shipment.record()}
            warning = shipping_warning(shipment, summary.get("eval_loss"), untrained)
            if warning:
                say(f"round {server_round}: WARNING shipped {warning}")
        self.rundir.append_metrics({"round": server_round, "shipped": results})
