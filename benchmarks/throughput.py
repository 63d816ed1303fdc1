"""Training throughput against the hardware limit, measured in the same run, and where the time goes.

Roofline: the best matmul GFLOP/s of each dtype on the model's own GEMM shapes (the MLP
projection and the LM head at B*T rows), measured before and after the training steps,
divided by the FLOPs one token costs. LoRA on a frozen base costs about 4 x params FLOPs
per token: 2N forward, 2N for the activation gradients of the backward, and no weight
gradients for the frozen base (the adapter's own are negligible at r=8). Attention's
T-dependent FLOPs are left out (~5% at T=128), so the roofline is slightly optimistic.

The profile (torch.profiler, one step per configuration) splits a step into matmuls
(aten::mm / addmm / bmm / linear's kernels), dtype conversions (aten::copy_ / to), and
the rest, and lists the top operators by self CPU time.
"""

from __future__ import annotations

import time

import torch

from benchmarks.dp_overhead import StepConfig, Stepper, lora_model, synthetic_batch, time_configs
from benchmarks.measure import table

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::matmul", "aten::linear"}
CAST_OPS = {"aten::copy_", "aten::to", "aten::_to_copy"}


def matmul_gflops(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)  # warm-up
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * m * k * n * runs / elapsed / 1e9


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def roofline(rows: int, hidden: int, inner: int, vocab: int, seconds: float = 1.0,
             dtypes: tuple[str, ...] = ("fp32", "bf16")) -> dict[str, float]:
    """Best GFLOP/s per dtype over the model's GEMM shapes."""
    shapes = [(rows, hidden, inner), (rows, inner, hidden), (rows, hidden, vocab)]
    return {name: max(matmul_gflops(DTYPES[name], *shape, seconds=seconds) for shape in shapes) for name in dtypes}


def flops_per_token(model) -> int:
    """4 x base parameters (model.parameters() counts a tied embedding once: its matmul is the LM head)."""
    return 4 * sum(p.numel() for p in model.parameters() if not p.requires_grad)


def profile_step(model, config: StepConfig, batch: dict, top: int = 8) -> dict:
    from torch.profiler import ProfilerActivity, profile

    stepper = Stepper(model, config, len(batch["input_ids"]))
    try:
        stepper.step(batch)  # warm-up outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            stepper.step(batch)
    finally:
        stepper.close()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)

    def share(names: set[str]) -> float:
        return sum(e.self_cpu_time_total for e in events if e.key in names) / total

    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"configuration": config.name, "step ms (profiled)": total / 1e3, "matmul share": share(MATMUL_OPS),
            "cast share": share(CAST_OPS),
            "top ops": [(e.key, e.self_cpu_time_total / total, e.count) for e in ranked]}


def run(model_ref: str = "smollm2", batch_size: int = 8, length: int = 128, mode: str = "hooks",
        repeats: int = 2, seconds: float = 1.0, autocasts: tuple[str, ...] = ("none", "bf16")) -> dict:
    model, tokenizer = lora_model(model_ref)
    cfg = model.config
    batch = synthetic_batch(len(tokenizer), batch_size, length)
    shape = (batch_size * length, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)
    dtypes = tuple("bf16" if ac == "bf16" else "fp32" for ac in autocasts)
    before = roofline(*shape, seconds=seconds, dtypes=dtypes)
    configs = [StepConfig(m, ac) for ac in autocasts for m in (None, mode)]
    medians = time_configs(model, configs, batch, repeats, steps=1)
    after = roofline(*shape, seconds=seconds, dtypes=dtypes)
    limit = {k: (before[k] + after[k]) / 2 for k in before}
    per_token = flops_per_token(model)
    rows = []
    for config in configs:
        seconds = medians[config]
        if isinstance(seconds, str):
            rows.append({"configuration": config.name, "tokens/s": seconds})
            continue
        dtype = "bf16" if config.autocast == "bf16" else "fp32"
        ceiling = limit[dtype] * 1e9 / per_token
        tps = batch_size * length / seconds
        rows.append({"configuration": config.name, "tokens/s": tps, "achieved GFLOP/s": tps * per_token / 1e9,
                     "roofline tok/s": ceiling, "x roofline": tps / ceiling,
                     "x fp32 roofline": tps / (limit["fp32"] * 1e9 / per_token) if "fp32" in limit else ""})
    profiles = [profile_step(model, c, batch) for c in configs if c.mode]
    model.eval()
    print(f"Throughput: {model_ref}, LoRA r=8 q,v, B={batch_size}, T={length}, {per_token / 1e6:.0f} MFLOP/token "
          f"(4 x base params), {torch.get_num_threads()} threads")
    print("matmul roofline GFLOP/s (before / after): "
          + ", ".join(f"{k} {before[k]:.0f} / {after[k]:.0f}" for k in before))
    print(table(list(rows[0]), [list(r.values()) for r in rows]))
    for p in profiles:
        print(f"\nprofile {p['configuration']}: {p['step ms (profiled)']:.0f} ms self CPU, matmul "
              f"{p['matmul share']:.0%}, casts {p['cast share']:.0%}")
        print(table(["op", "share", "calls"], [[k, f"{s:.1%}", n] for k, s, n in p["top ops"]]))
    return {"roofline_before": before, "roofline_after": after, "flops_per_token": per_token, "rows": rows,
            "profiles": profiles}
