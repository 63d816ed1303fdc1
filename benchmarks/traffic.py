"""Traffic: adapter bytes per client per round against the full fp32 model, per aggregation and wire dtype.

The bytes are Flower's own count of the ArrayRecord that travels (``count_bytes``),
built by the same ``sent_tensors`` + ``to_arrays`` the server and clients use. Down and
up carry the same tensors (the global adapter out, the client's adapter back). With
``--verify`` a short federated run of the tiny model per setting checks that the
bytes recorded in metrics.jsonl by a real run equal this count.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.measure import simulate, table
from slm.lora import LoraSpec, adapter_state, attach, sent_tensors, to_arrays

SETTINGS = [("fedavg", "float32"), ("fedavg", "float16"), ("ffa", "float32"), ("ffa", "float16")]


def adapter_bytes(model, aggregation: str, wire: str) -> int:
    return to_arrays(sent_tensors(adapter_state(model), aggregation), wire).count_bytes()


def model_bytes(model) -> int:
    """The full model in fp32 (a tied embedding counted once), what full-model FL would send."""
    return 4 * sum(p.numel() for p in model.parameters() if not p.requires_grad)


def run(model_ref: str = "smollm2", verify: bool = False, out: Path | None = None,
        ranks: tuple[int, ...] = (8, 4)) -> list[dict]:
    """Every setting at the default rank 8, then ffa + float16 at the other ranks."""
    rows = []
    for r in ranks:
        model, _ = attach(model_ref, LoraSpec(r=r, alpha=2 * r, dropout=0.0, target_modules=("q_proj", "v_proj")))
        full = model_bytes(model)
        for aggregation, wire in SETTINGS if r == ranks[0] else SETTINGS[-1:]:
            sent = adapter_bytes(model, aggregation, wire)
            rows.append({"rank": r, "aggregation": aggregation, "wire dtype": wire, "bytes down/client/round": sent,
                         "bytes up/client/round": sent, "full fp32 model bytes": full,
                         "fraction of model": f"1/{full / sent:,.0f}"})
    print(f"Traffic: {model_ref}, LoRA on q_proj,v_proj")
    print(table(list(rows[0]), [list(r.values()) for r in rows]))
    if verify:
        verify_with_runs(Path(out or tempfile.mkdtemp(prefix="fedslm-bench-traffic-")))
    return rows


def verify_with_runs(root: Path) -> list[dict]:
    """Real 1-round tiny federations: recorded bytes per client must equal the computed count."""
    spec = LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"))
    model, _ = attach("tiny", spec)
    checks = []
    for aggregation, wire in SETTINGS:
        settings = {"server.aggregation": aggregation, "server.wire-dtype": wire, "lora.dropout": 0.0}
        result = simulate("tiny", root / f"{aggregation}-{wire}", 2, settings, rounds=1)
        row = next(r for r in result.rows if r["round"] == 1)
        per_client_up = row["bytes_up"] / len(row["participants"])
        per_client_down = row["bytes_down"] / row["sampled"]
        expected = adapter_bytes(model, aggregation, wire)
        checks.append({"aggregation": aggregation, "wire dtype": wire, "recorded up": per_client_up,
                       "recorded down": per_client_down, "computed": expected,
                       "match": per_client_up == per_client_down == expected,
                       "eval loss r0 -> r1": f"{result.rows[0]['eval_loss']:.4f} -> {row['eval_loss']:.4f}"})
    print("\nverified by 1-round tiny federations (bytes from metrics.jsonl):")
    print(table(list(checks[0]), [list(c.values()) for c in checks]))
    return checks
