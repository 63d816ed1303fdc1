"""DP overhead: one DP-SGD step against the non-private LoRA step, same model, batch and dtype.

Every configuration (non-private; Opacus grad-sample modes hooks / functorch / ghost) x
(fp32; bf16 autocast) takes its steps interleaved with the others, repeat after repeat,
and the median step time per configuration is kept: drift of a noisy shared machine
then hits every configuration alike, and the printed ratios are what to compare.
The step is client.train.take_step, the function training uses.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.measure import table
from client.train import GRAD_SAMPLE_MODES, make_private, take_step
from privacy.mechanism.randomness import DpRandom, seed_key
from slm.lora import LoraSpec, adapter_state, attach, set_adapter_state


@dataclass(frozen=True)
class StepConfig:
    mode: str | None  # None = non-private
    autocast: str  # "none" | "bf16"

    @property
    def name(self) -> str:
        return f"{self.mode or 'non-private'} / {'bf16 autocast' if self.autocast == 'bf16' else 'fp32'}"


def lora_model(model_ref: str):
    """The benchmark's model: LoRA r=8 on q_proj, v_proj (the project's default adapter)."""
    spec = LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"))
    return attach(model_ref, spec)


def synthetic_batch(vocab: int, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full batch of ``length`` tokens per row, loss on every token: a fixed, padding-free shape."""
    ids = torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class Stepper:
    """A configuration ready to step: its forward module and (DP) optimizer."""

    def __init__(self, model, config: StepConfig, batch_size: int):
        self.config = config
        model.train()  # Opacus captures activations in training mode only
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-4)
        self.forward, self.optimizer = model, optimizer
        if config.mode:
            self.forward, self.optimizer = make_private(
                model, optimizer, mode=config.mode, noise_multiplier=1.0, clip_norm=1.0, batch_size=batch_size,
                dp_random=DpRandom(seed_key(0)))

    def step(self, batch) -> float:
        started = time.perf_counter()
        take_step(self.forward, self.optimizer, batch, mode=self.config.mode, autocast=self.config.autocast)
        return time.perf_counter() - started

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.mode:
            self.forward._close()


def time_configs(model, configs: list[StepConfig], batch: dict, repeats: int, steps: int) -> dict:
    """Median seconds per step of each configuration (or the error that stopped it)."""
    initial = adapter_state(model)
    timings: dict[StepConfig, list[float] | str] = {c: [] for c in configs}
    model.train()
    for repeat in range(repeats + 1):  # pass 0 warms up (allocator, oneDNN kernels) and is discarded
        for config in configs:
            if isinstance(timings[config], str):
                continue
            stepper = None
            try:
                stepper = Stepper(model, config, len(batch["input_ids"]))
                times = [stepper.step(batch) for _ in range(steps)]
                print(f"  pass {repeat}{' (warm-up)' if not repeat else ''}: {config.name} "
                      f"{', '.join(f'{t:.2f}' for t in times)} s", flush=True)
                if repeat:
                    timings[config].extend(times)
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:  # a mode Opacus cannot run here
                timings[config] = f"fails: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            finally:
                if stepper is not None:
                    stepper.close()
                set_adapter_state(model, initial)
    model.eval()
    return {c: (t if isinstance(t, str) else statistics.median(t)) for c, t in timings.items()}


def run(model_ref: str = "smollm2", batch_size: int = 8, length: int = 128, modes: list[str] | None = None,
        autocasts: list[str] | None = None, repeats: int = 3, steps: int = 1) -> list[dict]:
    model, tokenizer = lora_model(model_ref)
    batch = synthetic_batch(len(tokenizer), batch_size, length)
    modes = modes or list(GRAD_SAMPLE_MODES)
    autocasts = autocasts or ["none", "bf16"]
    configs = [StepConfig(mode, ac) for ac in autocasts for mode in [None, *modes]]
    medians = time_configs(model, configs, batch, repeats, steps)
    results = []
    for config in configs:
        seconds, base = medians[config], medians[StepConfig(None, config.autocast)]
        ok = not isinstance(seconds, str) and not isinstance(base, str)
        results.append({"configuration": config.name, "s/step": seconds,
                        "tokens/s": batch_size * length / seconds if ok else "",
                        "x non-private": seconds / base if ok else "",
                        "x fp32 non-private": seconds / medians[StepConfig(None, "none")]
                        if ok and not isinstance(medians.get(StepConfig(None, "none"), ""), str) else ""})
    print(f"DP overhead: {model_ref}, LoRA r=8 q,v, B={batch_size}, T={length}, median of {repeats} x {steps} "
          f"interleaved steps, {torch.get_num_threads()} threads")
    print(table(list(results[0]), [list(r.values()) for r in results]))
    return results
