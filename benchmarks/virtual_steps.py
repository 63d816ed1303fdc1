"""Memory and time of one DP-SGD step by expected batch, physical batch and loss.

Each configuration runs in its own process (peak RSS only grows within a process): load
SmolLM2 with the default adapter (r=8 on q_proj, v_proj), reset the peak-RSS mark
(/proc/self/clear_refs, Linux), take one warm-up step (on one physical piece) and
``repeats`` timed DP steps (Opacus hooks, Adam) on a fixed SFT-like batch of ``expected``
rows (T tokens, loss on the second half: the response), and report the peak RSS of the
steps and the median step's seconds.
- virtual steps: expected 8 / 64 / 256 at physical 8 must keep the peak flat;
- the loss: ``full`` (B x T x V logits, slm.loss.full_logits_loss) against ``chunked``
  (logits at loss positions only, checkpointed chunks: slm.loss.per_example_loss).
The step is client.train.take_step, the function training uses.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.measure import table

IGNORE = -100


def sft_like_batch(vocab: int, rows: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``rows`` full rows of ``length`` tokens; the first half is prompt (no loss), the second the response."""
    ids = torch.randint(4, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, : length // 2] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def child(model_ref: str, loss: str, expected: int, physical: int, length: int, repeats: int = 1) -> dict:
    """One configuration, in this process; the median of ``repeats`` timed steps."""
    from client.train import make_private, take_step
    from privacy.mechanism.randomness import DpRandom, seed_key
    from slm.lora import LoraSpec, attach
    from slm.loss import full_logits_loss, per_example_loss

    model, tokenizer = attach(model_ref, LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj")))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    forward, optimizer = make_private(model, torch.optim.Adam(params, lr=1e-4), mode="hooks", noise_multiplier=1.0,
                                      clip_norm=1.0, batch_size=expected, dp_random=DpRandom(seed_key(0)))
    batch = sft_like_batch(len(tokenizer), expected, length)
    loss_fn = {"full": full_logits_loss, "chunked": per_example_loss}[loss]
    loaded = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM (peak RSS) to the current RSS
    warm = {k: v[:physical] for k, v in batch.items()} if physical else batch  # one piece warms the kernels
    take_step(forward, optimizer, warm, mode="hooks", physical_batch_size=physical, loss=loss_fn)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        take_step(forward, optimizer, batch, mode="hooks", physical_batch_size=physical, loss=loss_fn)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    peak = _status_kib("VmHWM")
    return {"loss": loss, "expected batch": expected, "physical": physical or expected, "s/step": seconds,
            "tokens/s": expected * length / seconds, "RSS loaded MiB": loaded / 1024, "peak RSS MiB": peak / 1024,
            "step peak - loaded MiB": (peak - loaded) / 1024}


def run(model_ref: str = "smollm2", length: int = 128, expected: list[int] | None = None, physical: int = 8,
        losses: list[str] | None = None, repeats: int = 1) -> list[dict]:
    results = []
    for loss in losses or ["chunked"]:
        for size in expected or [8, 64, 256]:
            out = subprocess.run([sys.executable, "-m", "benchmarks.virtual_steps", model_ref, loss, str(size),
                                  str(physical), str(length), str(repeats)], capture_output=True, text=True,
                                 check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {results[-1]}", flush=True)
    print(f"One DP-SGD step (hooks, Adam; median of {repeats}): {model_ref}, LoRA r=8 q,v, T={length}, "
          "loss on the second half, "
          f"{torch.get_num_threads()} threads")
    print(table(list(results[0]), [list(r.values()) for r in results]))
    return results


if __name__ == "__main__":
    from slm.quiet import quiet_libraries

    quiet_libraries()
    ref, loss_name, size, phys, tokens = sys.argv[1:6]
    print(json.dumps(child(ref, loss_name, int(size), int(phys), int(tokens), int(sys.argv[6:7] and sys.argv[6] or 1))))
