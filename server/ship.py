"""Build device artifacts from a round's global adapter, and ship them to the clients.

For round k: merge the adapter into the base (fp32 HF directory), export GGUF files
(Q8_0, Q4_0, F16 as configured), and write a manifest next to each artifact: base model,
run id, round, quantization, sha256, bytes, eval metrics and the privacy summary (each
client's epsilon and delta so far). Shipping sends each file through Flower with its
sha256; a client verifies it before storing, evaluates it on its own held-out split and
replies metrics only, so the run records fp32 vs Q8_0 vs Q4_0 federated evaluation.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from slm.jsonfiles import write_json_atomic
from slm.base import resolve_model_dir, smollm2_gguf_path
from slm.errors import UserError
from slm.export import QUANTS, merge_adapter, write_gguf
from slm.imatrix import CALIBRATION, calibration_texts, importance_matrix

SHIP = "evaluate.ship"
QUANTIZER = {"f16": "f16 (norms f32)", "q8_0": "gguf-py reference (max/127)",
             "q4_0": f"importance-weighted scale search, calibration {CALIBRATION.name}"}


@dataclass(frozen=True)
class Artifact:
    path: Path
    quant: str
    sha256: str
    bytes: int


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_quants(text: str) -> list[str]:
    quants = [q.strip().lower() for q in text.split(",") if q.strip()]
    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        raise UserError(f"quantization {', '.join(unknown)}: choose from {', '.join(QUANTS)}")
    return quants


def privacy_summary(run_dir: Path) -> dict:
    """Each client's latest privacy record (epsilon so far, delta) from the server's view."""
    view_path = run_dir / "privacy" / "ledger.json"
    if not view_path.is_file():
        return {}
    view = json.loads(view_path.read_text())
    summary = {name: {k: records[-1].get(k) for k in ("epsilon", "epsilon_rdp", "delta", "max_epsilon", "status")}
               for name, records in view.get("clients", {}).items() if records}
    if view.get("user_level"):
        summary["user_level"] = view["user_level"][-1]
    return summary


def build_artifacts(run_dir: Path, config: dict, server_round: int, quants: list[str],
                    eval_metrics: dict | None = None, out: Path | None = None) -> list[Artifact]:
    """Merge round ``server_round``'s adapter and export it (into ``out``, default RUN_DIR/model)."""
    adapter = run_dir / "adapters" / f"round-{server_round}"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(f"run directory {run_dir}: {adapter} has no adapter to export")
    if config["model.name"] != "smollm2" and quants:
        raise UserError("GGUF export needs the base's GGUF as a template: only the default smollm2 base "
                        "(export the merged HF directory with --quant '' for other bases)")
    out = out or run_dir / "model"
    started = time.time()
    merged, tokenizer = merge_adapter(config["model.name"], adapter, out / "merged")
    # 4-bit rounding weighted by activation statistics of public calibration text (slm.imatrix)
    importance = importance_matrix(merged, tokenizer, calibration_texts(tokenizer)) if "q4_0" in quants else None
    common = {"base_model": config["model.name"], "base_path": str(resolve_model_dir(config["model.name"])),
              "run_id": run_dir.name, "round": server_round, "eval": eval_metrics or {},
              "privacy": privacy_summary(run_dir)}
    merged_bytes = sum(p.stat().st_size for p in (out / "merged").iterdir())
    write_json_atomic(out / "merged" / "manifest.json", {**common, "format": "hf-safetensors", "quantization": "f32",
                                                         "bytes": merged_bytes})
    artifacts = []
    for quant in quants:
        path = out / f"fedslm-{quant}.gguf"
        tmp = path.with_suffix(".gguf.tmp")
        write_gguf(merged.state_dict(), merged.config, smollm2_gguf_path(), tmp, quant,
                   name=f"fedslm {run_dir.name} round {server_round}", importance=importance)
        tmp.replace(path)
        artifact = Artifact(path=path, quant=quant, sha256=sha256_of(path), bytes=path.stat().st_size)
        write_json_atomic(path.with_suffix(".manifest.json"), {
            **common, "format": "gguf", "quantization": quant, "file": path.name, "sha256": artifact.sha256,
            "bytes": artifact.bytes, "size_vs_fp32": artifact.bytes / merged_bytes,
            "quantizer": QUANTIZER[quant]})
        artifacts.append(artifact)
    print(f"[fedslm] exported round {server_round} in {time.time() - started:.0f}s: "
          + ", ".join(f"{a.quant} {a.bytes / 1e6:.1f} MB ({a.bytes / merged_bytes:.3f}x fp32)" for a in artifacts),
          flush=True)
    return artifacts


def ship_messages(artifact: Artifact, node_ids, config: dict) -> list[Message]:
    payload = np.fromfile(artifact.path, dtype=np.uint8)
    content = RecordDict({"artifact": ArrayRecord(array_dict={"file": Array(payload)}),
                          "config": ConfigRecord({**config, "file": artifact.path.name, "quant": artifact.quant,
                                                  "sha256": artifact.sha256, "bytes": artifact.bytes})})
    return [Message(content=content, message_type=SHIP, dst_node_id=n) for n in node_ids]
