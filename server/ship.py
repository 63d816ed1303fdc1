"""Build device artifacts from a round's global adapter, and ship them to the clients.

``ship.kind`` chooses what a device receives after round k:

- ``merged``: the adapter merged into the base (fp32 HF directory) and exported as GGUF
  files (Q8_0, Q4_0, F16 as ``ship.quantizations``), 85-145 MB each: for devices without
  the base;
- ``adapter``: the adapter alone as a llama.cpp LoRA GGUF (slm.export_lora, 0.9 MB) for
  devices that hold the base. A device's base is the round-0 (untrained) base exported
  by the same code path in each of ``ship.quantizations``; it is installed once per run
  (shipped, verified and evaluated like any file: the "base q4_0" row is what the device
  starts from, its bytes a one-time install), then every update is the adapter file,
  which each device evaluates on its own base (``adapter+q4_0``), as a phone keyboard
  app ships its base in the app and downloads only updates;
- ``both``.

Each artifact gets a manifest (base model, run id, round, quantization, sha256, bytes,
eval metrics and the privacy summary: each client's epsilon and delta so far). Shipping
sends each file through Flower with its sha256; a client verifies it before storing,
evaluates it on its own held-out split and replies metrics only, so the run records fp32
vs every shipped file, and the console flags a file worse than the untrained base.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedslm.common.errors import UserError
from fedslm.common.jsonfiles import write_json_atomic
from fedslm.common.vocabulary import RunConfig
from privacy.report.shipped import worse_than_base
from slm.base import resolve_model_dir, smollm2_gguf_path
from slm.digest import sha256_of
from slm.export import QUANTS, merge_adapter, write_gguf
from slm.export_lora import ADAPTER_DTYPE, write_lora_gguf
from slm.imatrix import CALIBRATION, calibration_texts, importance_matrix

SHIP = "evaluate.ship"
SHIP_KINDS = ("merged", "adapter", "both")
QUANTIZER = {"f16": "f16 (norms f32)", "q8_0": "gguf-py reference (max/127)",
             "q4_0": f"importance-weighted scale search, calibration {CALIBRATION.name}"}


@dataclass(frozen=True)
class Artifact:
    path: Path
    quant: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Shipment:
    """One file for every evaluating client, under the name its evaluation gets in metrics.jsonl.

    ``role``: "merged" (a whole model), "base" (the device base, installed once per run)
    or "adapter" (applied by each device on ``base``, which it must already hold).
    """

    label: str
    artifact: Artifact
    role: str
    base: Artifact | None = None

    def announce(self) -> dict:
        """What the client is told besides the file: its role and, for an adapter, the base it goes on."""
        extra = {"role": self.role}
        if self.base is not None:
            extra.update({"base-file": self.base.path.name, "base-sha256": self.base.sha256})
        return extra

    def record(self) -> dict:
        row = {"sha256": self.artifact.sha256, "bytes": self.artifact.bytes, "file": self.artifact.path.name,
               "role": self.role}
        return {**row, "base_file": self.base.path.name} if self.base is not None else row


def parse_kind(text: str) -> str:
    kind = text.strip().lower()
    if kind not in SHIP_KINDS:
        raise UserError(f"config key 'ship.kind': {text!r}, choose from {', '.join(SHIP_KINDS)}")
    return kind


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


def _common(run_dir: Path, specs: RunConfig, server_round: int, eval_metrics: dict | None) -> dict:
    return {"base_model": specs.model.name, "base_path": str(resolve_model_dir(specs.model.name)),
            "run_id": run_dir.name, "round": server_round, "eval": eval_metrics or {},
            "privacy": privacy_summary(run_dir)}


def build_artifacts(run_dir: Path, specs: RunConfig, server_round: int, quants: list[str],
                    eval_metrics: dict | None = None, out: Path | None = None,
                    stem: str = "fedslm") -> list[Artifact]:
    """Merge round ``server_round``'s adapter and export it (into ``out``, default RUN_DIR/model)."""
    adapter = run_dir / "adapters" / f"round-{server_round}"
    if not (adapter / "adapter_model.safetensors").is_file():
        raise UserError(f"run directory {run_dir}: {adapter} has no adapter to export")
    if specs.model.name != "smollm2" and quants:
        raise UserError("GGUF export needs the base's GGUF as a template: only the default smollm2 base "
                        "(export the merged HF directory with --quant '' for other bases)")
    out = out or run_dir / "model"
    started = time.time()
    merged, tokenizer = merge_adapter(specs.model.name, adapter, out / "merged")
    # 4-bit rounding weighted by activation statistics of public calibration text (slm.imatrix)
    importance = importance_matrix(merged, tokenizer, calibration_texts(tokenizer)) if "q4_0" in quants else None
    common = _common(run_dir, specs, server_round, eval_metrics)
    merged_bytes = sum(p.stat().st_size for p in (out / "merged").iterdir())
    write_json_atomic(out / "merged" / "manifest.json", {**common, "format": "hf-safetensors", "quantization": "f32",
                                                         "bytes": merged_bytes})
    artifacts = []
    for quant in quants:
        path = out / f"{stem}-{quant}.gguf"
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


def device_bases(run_dir: Path, specs: RunConfig, quants: list[str]) -> list[Artifact]:
    """The untrained base in each quantization, as devices hold it: exported once per run.

    Round 0's adapter has B = 0, so its merge is the base itself, through the very code
    path (merge, importance matrix, GGUF writer) the merged files take.
    """
    out = run_dir / "model" / "base"
    paths = [out / f"fedslm-base-{quant}.gguf" for quant in quants]
    if not all(p.with_suffix(".manifest.json").is_file() for p in paths):
        build_artifacts(run_dir, specs, 0, quants, out=out, stem="fedslm-base")
    artifacts = []
    for quant, path in zip(quants, paths):
        manifest = json.loads(path.with_suffix(".manifest.json").read_text())
        artifacts.append(Artifact(path=path, quant=quant, sha256=manifest["sha256"], bytes=manifest["bytes"]))
    return artifacts


def build_adapter(run_dir: Path, specs: RunConfig, server_round: int, eval_metrics: dict | None = None,
                  out: Path | None = None) -> Artifact:
    """Round ``server_round``'s global adapter as a llama.cpp LoRA GGUF, with its manifest."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    adapter = run_dir / "adapters" / f"round-{server_round}" / "adapter_model.safetensors"
    if not adapter.is_file():
        raise UserError(f"run directory {run_dir}: {adapter.parent} has no adapter to export")
    out = out or run_dir / "model"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fedslm-adapter.gguf"
    tmp = path.with_suffix(".gguf.tmp")
    base_config = AutoConfig.from_pretrained(resolve_model_dir(specs.model.name), local_files_only=True)
    write_lora_gguf(load_file(str(adapter)), alpha=specs.lora.alpha, config=base_config, out=tmp,
                    name=f"fedslm {run_dir.name} round {server_round} adapter")
    tmp.replace(path)
    artifact = Artifact(path=path, quant="adapter", sha256=sha256_of(path), bytes=path.stat().st_size)
    write_json_atomic(path.with_suffix(".manifest.json"), {
        **_common(run_dir, specs, server_round, eval_metrics), "format": "gguf-lora", "file": path.name,
        "quantization": ADAPTER_DTYPE, "sha256": artifact.sha256, "bytes": artifact.bytes,
        "lora": {"r": specs.lora.r, "alpha": specs.lora.alpha, "target_modules": specs.lora.target_modules},
        "applies_to": [f"fedslm-base-{q}.gguf" for q in parse_quants(specs.ship.quantizations)]})
    return artifact


def installed_bases(run_dir: Path) -> set[str]:
    """Labels of the device bases already shipped in this run ("base q4_0"), from metrics.jsonl."""
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    return {label for row in rows for label in row.get("shipped", {}) if label.startswith("base ")}


def plan_shipments(run_dir: Path, specs: RunConfig, server_round: int, eval_metrics: dict | None = None
                   ) -> list[Shipment]:
    """Export this round's files as ``ship.kind`` asks; the device bases go first, once per run."""
    kind, quants = parse_kind(specs.ship.kind), parse_quants(specs.ship.quantizations)
    shipments = []
    if kind in ("merged", "both"):
        shipments += [Shipment(a.quant, a, "merged")
                      for a in build_artifacts(run_dir, specs, server_round, quants, eval_metrics)]
    if kind in ("adapter", "both"):
        installed = installed_bases(run_dir)
        bases = device_bases(run_dir, specs, quants)
        adapter = build_adapter(run_dir, specs, server_round, eval_metrics)
        shipments += [Shipment(f"base {b.quant}", b, "base") for b in bases if f"base {b.quant}" not in installed]
        shipments += [Shipment(f"adapter+{b.quant}", adapter, "adapter", base=b) for b in bases]
    return shipments


def round0_eval_loss(run_dir: Path) -> float | None:
    """The untrained base's federated eval loss (metrics.jsonl round 0): what every shipped file must beat."""
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        row = json.loads(line) if line.strip() else {}
        if row.get("round") == 0 and "shipped" not in row and row.get("eval_loss") is not None:
            return float(row["eval_loss"])
    return None


def shipping_warning(shipment: Shipment, eval_loss: float | None, base_loss: float | None) -> str | None:
    """The console's plain flag for an update that is worse than the untrained base (installs are the base)."""
    if shipment.role == "base":
        return None
    return worse_than_base(shipment.label, eval_loss, base_loss)


def ship_messages(shipment: Shipment, node_ids, config: dict) -> list[Message]:
    artifact = shipment.artifact
    payload = np.fromfile(artifact.path, dtype=np.uint8)
    content = RecordDict({"artifact": ArrayRecord(array_dict={"file": Array(payload)}),
                          "config": ConfigRecord({**config, **shipment.announce(), "file": artifact.path.name,
                                                  "quant": shipment.label, "sha256": artifact.sha256,
                                                  "bytes": artifact.bytes})})
    return [Message(content=content, message_type=SHIP, dst_node_id=n) for n in node_ids]
