"""A client process for the kill -9 test: reserve, note the start, train, commit; forever.

Usage: python ledger_worker.py LEDGER_DIR MARKER_FILE
"""

import os
import sys
from pathlib import Path

from client.train import train_adapter
from fedslm.common.config import resolve
from privacy.mechanism.ledger import fingerprint
from privacy.mechanism.transaction import Release, SiteBudget, open_release
from slm.lora import LoraSpec, attach
from slm.tasks import Task

RECORDS = [{"question": f"q{i}?", "answer": f"answer number {i}"} for i in range(40)]
STEPS, BATCH = 20, 4  # what is reserved is what is trained (the release and its accounting are one)


def main(ledger_dir: str, marker: str) -> None:
    model, tok = attach("tiny", LoraSpec.from_config(resolve({"model.name": "tiny"})))
    task = Task(kind="sft", max_length=32)
    budget = SiteBudget(ledger_dir=Path(ledger_dir), max_epsilon=1e9, delta=1e-5, max_noise_multiplier=5.0)
    print("ready", flush=True)
    round_ = 0
    while True:
        round_ += 1
        grant = open_release(budget, Release(run_id=f"pid{os.getpid()}", round=round_, clip_norm=1.0,
                                             sample_rate=BATCH / len(RECORDS), steps=STEPS, requested_sigma=2.0),
                             fingerprint=fingerprint(RECORDS), records=len(RECORDS))
        with open(marker, "a") as handle:  # training starts only after the reservation is on disk
            handle.write(f"{grant.entry.run_id}:{round_}\n")
            handle.flush()
            os.fsync(handle.fileno())
        train_adapter(model, tok, task, RECORDS, steps=grant.entry.steps, batch_size=BATCH, lr=0.01,
                      noise_multiplier=grant.noise_multiplier, clip_norm=grant.entry.clip_norm, seed=round_)
        grant.commit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
