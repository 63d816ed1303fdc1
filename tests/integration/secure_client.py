"""The real ClientApp under secure aggregation, with a window onto what the server must never see.

Every site keeps a copy of its clear B (as it would have sent it) in
<run-dir>/clear-updates/<site>-round-<k>.safetensors, so a test can compare the secure sum
with the clear FFA aggregate of the same updates. Partition 3 crashes while training in
the masked stage, after the keys are shared: a dropout the protocol must absorb.
"""

from pathlib import Path

from flwr.clientapp import ClientApp
from safetensors.torch import save_file

from client import app as honest
from client import secure_aggregation
from slm.lora import from_arrays

app = ClientApp()


def spying(msg, context):
    if int(context.node_config["partition-id"]) == 3:
        raise RuntimeError("injected crash in client 3 while training")
    reply = honest.train_clear(msg, context)
    if "arrays" in reply.content:
        out = Path(str(msg.content["config"]["run-dir"])) / "clear-updates"
        out.mkdir(exist_ok=True)
        name, k = reply.content["privacy"]["client"], msg.content["config"]["server-round"]
        save_file(from_arrays(reply.content["arrays"]), str(out / f"{name}-round-{k}.safetensors"))
    return reply


@app.train()
def train(msg, context):
    return secure_aggregation.masked_train(msg, context, spying)


@app.evaluate()
def evaluate(msg, context):
    return honest.evaluate_adapter(msg, context)
