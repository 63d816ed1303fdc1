"""A client process for the kill -9 test: reserve, note the start, train, commit; forever.

Usage: python ledger_worker.py LEDGER_DIR MARKER_FILE
"""

import os
import sys
from pathlib import Path

from client.train import train_adapter
from privacy.mechanism.ledger import Entry, Ledger, fingerprint
from slm.config import resolve
from slm.lora import LoraSpec, attach
from slm.tasks import Task

RECORDS = [{"question": f"q{i}?", "answer": f"answer number {i}"} for i in range(40)]


def main(ledger_dir: str, marker: str) -> None:
    model, tok = attach("tiny", LoraSpec.from_config(resolve({"model.name": "tiny"})))
    task = Task(kind="sft", max_length=32)
    print("ready", flush=True)
    round_ = 0
    while True:
        round_ += 1
        ledger = Ledger.open(Path(ledger_dir), fingerprint=fingerprint(RECORDS), records=len(RECORDS), delta=1e-5)
        entry = ledger.reserve(Entry(run_id=f"pid{os.getpid()}", round=round_, noise_multiplier=2.0, clip_norm=1.0,
                                     sample_rate=0.1, steps=2, delta=1e-5, epsilon_after=0.0, epsilon_rdp_after=0.0,
                                     max_epsilon=1e9, status=""), budget=1e9)
        with open(marker, "a") as handle:  # training starts only after the reservation is on disk
            handle.write(f"{entry.run_id}:{round_}\n")
            handle.flush()
            os.fsync(handle.fileno())
        train_adapter(model, tok, task, RECORDS, steps=20, batch_size=4, lr=0.01, noise_multiplier=2.0,
                      clip_norm=1.0, seed=round_)
        ledger.commit(entry)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
