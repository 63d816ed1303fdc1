"""A ClientApp that misbehaves by partition, for fault-injection runs.

partition 0: honest; 1: replies NaN adapter values; 2: replies a tensor of the wrong
shape; 3: raises. Everything else is the real client (real DP-SGD, real ledger).
"""

import torch
from flwr.clientapp import ClientApp

from client import app as honest
from slm.lora import from_arrays, to_arrays

app = ClientApp()


@app.train()
def train(msg, context):
    partition = int(context.node_config["partition-id"])
    if partition == 3:
        raise RuntimeError("injected crash in client 3")
    reply = honest.train(msg, context)
    if partition in (1, 2):
        state = from_arrays(reply.content["arrays"])
        name = sorted(state)[0]
        if partition == 1:
            state[name] = torch.full_like(state[name], float("nan"))
        else:
            state[name] = torch.zeros(3, 3)
        reply.content["arrays"] = to_arrays(state)
    return reply


@app.evaluate()
def evaluate(msg, context):
    return honest.evaluate_adapter(msg, context)
