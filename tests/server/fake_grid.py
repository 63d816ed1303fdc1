"""A stand-in for Flower's Grid and sites, to drive server.rounds.Federation without Flower or a model.

Each fake site answers by a behaviour: "ok" (a fixed update), "still" (returns the adapter
unchanged, so a user-level release is the old adapter plus noise), "refuse" (budget exhausted),
"crash" (an error reply), "nan" (a non-finite update), "silent" (no reply).
"""

from types import SimpleNamespace

import torch

from slm.lora import from_arrays, to_arrays

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def initial_adapter() -> dict:
    g = torch.Generator().manual_seed(0)
    return {A: torch.randn(8, 16, generator=g), B: torch.zeros(16, 8)}


def reply(node: int, content: dict, error: str | None = None):
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), content=content,
                           has_error=lambda: error is not None, error=SimpleNamespace(reason=error))


class FakeMessage:
    def __init__(self, content, message_type: str, dst_node_id: int):
        self.content, self.message_type, self.dst_node_id = content, message_type, dst_node_id


class FakeGrid:
    def __init__(self, sites: dict[int, tuple[str, str]], dp: bool = True, eval_metrics=None):
        self.sites, self.dp, self.sent = sites, dp, []  # sent: (message type, node, server round)
        self.eval_metrics = eval_metrics or (lambda node: {})  # a site's extra metrics (accuracies)

    def get_node_ids(self):
        return list(self.sites)

    def send_and_receive(self, messages, timeout):
        out = []
        for message in messages:
            node = message.dst_node_id
            name, behaviour = self.sites[node]
            self.sent.append((message.message_type, node, message.content["config"]["server-round"]))
            if behaviour == "silent":
                continue
            if message.message_type == "evaluate":
                out.append(reply(node, {"metrics": {"eval_loss": 2.0 + node / 100, "eval_tokens": 50,
                                                    "eval_examples": 5, "num-examples": 5,
                                                    **self.eval_metrics(node)},
                                        "info": {"client": name}}))
            elif behaviour == "crash":
                out.append(reply(node, {}, error="Traceback (most recent call last):\nRuntimeError: injected crash"))
            elif behaviour == "refuse":
                out.append(reply(node, {"privacy": {"client": name, "status": "refused",
                                                    "reason": "budget exhausted: eps 8.1 > 8"},
                                        "metrics": {"num-examples": 0}}))
            else:
                received = from_arrays(message.content["arrays"])
                value = {"nan": float("nan"), "still": 0.0}.get(behaviour, 0.01 * node)
                update = {k: v + value for k, v in received.items()}
                metrics = {"num-examples": 225, "steps": 5}
                privacy = {"client": name, "status": "committed", "epsilon": 6.309, "noise_multiplier": 0.5}
                if not self.dp:
                    metrics.update({"train_loss": 2.0, "seconds": 3.0})
                    privacy = {"client": name, "status": "no-dp"}
                out.append(reply(node, {"arrays": to_arrays(update, "float16"), "metrics": metrics,
                                        "privacy": privacy}))
        return out
