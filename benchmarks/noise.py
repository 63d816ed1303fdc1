"""What the DP noise generator costs per DP-SGD step: ChaCha20 (a CSPRNG) vs torch's Mersenne Twister.

Every DP draw comes from privacy.mechanism.randomness.DpRandom (a ChaCha20 keystream; the
Gaussian by float64 Box-Muller, then rounded to the parameter's dtype). Before, Opacus drew
``torch.normal`` in float32 from a torch CPU generator (MT19937). Measured here, per step:

1. the noise of the default SmolLM2-135M adapter (r=8 on q_proj, v_proj, 30 layers), drawn
   tensor by tensor as ``client.train._CsprngNoise.add_noise`` does: FFA-LoRA trains only the
   B factors, 30 x (576 x 8 + 192 x 8) = 184,320 values; A and B: 460,800;
2. the Poisson mask over a client's records (225: a hospital client; 100,000): DpRandom.bernoulli
   vs ``torch.rand(n, generator=g) < q`` (Opacus' sampler);
3. both as a share of a SmolLM2 DP step, from the step times BENCHMARKS.md records (nothing
   is trained here);
4. what an exact discrete Gaussian (Canonne, Kamath & Steinke, NeurIPS 2020) would cost: their
   sampler (Algorithm 1: Bernoulli(exp(-gamma)); Algorithm 2: discrete Laplace; Algorithm 3:
   discrete Gaussian by rejection from the discrete Laplace) in exact rational arithmetic
   (``fractions.Fraction``), its random integers read from the ChaCha20 keystream. Bench code
   only, not the product's sampler. Timed per sample and extrapolated to 184,320 values.

Each timing is the median of ``repeats`` after one warm-up; the same process, the same threads.
"""

from __future__ import annotations

import math
import statistics
import time
from fractions import Fraction
from functools import partial

import torch

from benchmarks.measure import table
from privacy.mechanism.randomness import DpRandom, round_key

# SmolLM2-135M: 30 decoder layers, hidden 576, k/v projections 576 -> 192 (3 KV heads x 64)
LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 8

# DP-SGD steps of SmolLM2-135M recorded in BENCHMARKS.md: (what, section, seconds, trains A too)
RECORDED_STEPS = (
    ("DP step, B=8, T=128, hooks (AVX2 EPYC)", "11", 3.09, True),
    ("hospital recipe, B=8, clip 0.1, FFA: 58 s / 16 steps (Xeon AMX)", "13", 58 / 16, False),
    ("hospital client's DP round, int8 base (Xeon AMX)", "12", 5.0, True),
    ("the same round, phone memory profile (Xeon AMX)", "12", 20.4, True),
)
STEP_RECORDS = 225  # the Poisson mask of those steps: a hospital client's 225 records (GARD)


def adapter_shapes(layers: int = LAYERS, ffa: bool = True) -> list[tuple[int, int]]:
    """The trained LoRA tensors of the default adapter: B (out x r) of q_proj and v_proj; with A (r x in) too."""
    shapes = []
    for _ in range(layers):
        shapes += [(HIDDEN, RANK), (KV, RANK)]
        if not ffa:
            shapes += [(RANK, HIDDEN), (RANK, HIDDEN)]
    return shapes


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def chacha_noise(rng: DpRandom, shapes, std: float) -> list[torch.Tensor]:
    """As add_noise: float64 Box-Muller from the keystream, rounded to float32 (the summed gradient's dtype)."""
    return [torch.from_numpy(rng.normal(shape, std)).to(torch.float32) for shape in shapes]


def torch_noise(generator: torch.Generator, shapes, std: float) -> list[torch.Tensor]:
    """Opacus 1.6.0's _generate_noise before: torch.normal in float32 from a CPU generator (MT19937)."""
    return [torch.normal(0.0, std, shape, generator=generator) for shape in shapes]


def torch_mask(generator: torch.Generator, n: int, q: float) -> torch.Tensor:
    """Opacus' Poisson sampler (UniformWithReplacementSampler) before: uniforms from the CPU generator, < q."""
    return torch.rand(n, generator=generator) < q


# --- the exact discrete Gaussian (Canonne, Kamath & Steinke 2020), bench code only ------------------------------

class KeystreamInts:
    """Uniform integers from a DpRandom keystream (read in chunks): ``randbelow`` by rejection, as random.randbelow."""

    def __init__(self, rng: DpRandom, chunk: int = 1 << 14):
        self.rng, self.chunk = rng, chunk
        self._buffer, self._at = b"", 0

    def getrandbits(self, k: int) -> int:
        size = (k + 7) // 8
        if self._at + size > len(self._buffer):
            self._buffer = self._buffer[self._at:] + self.rng.keystream(max(self.chunk, size))
            self._at = 0
        word = int.from_bytes(self._buffer[self._at:self._at + size], "little")
        self._at += size
        return word >> (8 * size - k)

    def randbelow(self, m: int) -> int:
        """Uniform on {0, ..., m-1}: k = bit length of m random bits, rejected while >= m (< 2 tries expected)."""
        if m < 1:
            raise ValueError(f"randbelow needs m >= 1, got {m}")
        if m == 1:
            return 0
        k = m.bit_length()
        while True:
            r = self.getrandbits(k)
            if r < m:
                return r


def bernoulli(p: Fraction, ints: KeystreamInts) -> bool:
    """Exactly Bernoulli(p), p rational in [0, 1]."""
    return ints.randbelow(p.denominator) < p.numerator


def bernoulli_exp(gamma: Fraction, ints: KeystreamInts) -> bool:
    """Exactly Bernoulli(exp(-gamma)), gamma >= 0 rational (CKS 2020, Algorithm 1)."""
    while gamma > 1:  # exp(-gamma) = exp(-1)^floor * exp(-rest)
        if not bernoulli_exp(Fraction(1), ints):
            return False
        gamma -= 1
    k = 1  # gamma in [0, 1]: draw A_k ~ Bernoulli(gamma / k) until one is 0; K odd with probability exp(-gamma)
    while bernoulli(gamma / k, ints):
        k += 1
    return k % 2 == 1


def geometric_exp(x: Fraction, ints: KeystreamInts) -> int:
    """P(V = v) = (1 - exp(-x)) exp(-x v), v = 0, 1, ... (CKS 2020, Algorithm 2's geometric, x = s/t)."""
    s, t = x.numerator, x.denominator
    while True:
        u = ints.randbelow(t)
        if bernoulli_exp(Fraction(u, t), ints):
            break
    v = 0
    while bernoulli_exp(Fraction(1), ints):
        v += 1
    return (v * t + u) // s


def discrete_laplace(t: int, ints: KeystreamInts) -> int:
    """P(Y = y) proportional to exp(-|y| / t), integer t >= 1 (CKS 2020, Algorithm 2)."""
    while True:
        negative = bernoulli(Fraction(1, 2), ints)
        magnitude = geometric_exp(Fraction(1, t), ints)
        if not (negative and magnitude == 0):
            return -magnitude if negative else magnitude


def discrete_gaussian(sigma2: Fraction, ints: KeystreamInts) -> int:
    """P(Y = y) proportional to exp(-y^2 / (2 sigma^2)) on the integers, exactly (CKS 2020, Algorithm 3)."""
    t = math.isqrt(sigma2.numerator // sigma2.denominator) + 1  # floor(sigma) + 1
    while True:
        y = discrete_laplace(t, ints)
        if bernoulli_exp((abs(y) - sigma2 / t) ** 2 / (2 * sigma2), ints):
            return y


def discrete_gaussian_row(sigma: float, samples: int, ints: KeystreamInts, values: int, chacha_us: float) -> dict:
    sigma2 = Fraction(sigma) ** 2
    discrete_gaussian(sigma2, ints)  # warm-up
    started = time.perf_counter()
    draws = [discrete_gaussian(sigma2, ints) for _ in range(samples)]
    us = 1e6 * (time.perf_counter() - started) / samples
    mean, var = statistics.fmean(draws), statistics.pvariance(draws)
    mean_ok = abs(mean) < 5 * sigma / math.sqrt(samples)  # 5 standard errors
    var_ok = 0.5 < var / float(sigma2) < 1.5  # loose: a few hundred samples
    return {"sigma (grid units)": sigma, "samples": samples, "us/sample": us,
            f"s per step ({values:,} values)": us * values / 1e6, "x ChaCha20 Box-Muller": us / chacha_us,
            "mean / sigma": mean / sigma, "var / sigma^2": var / float(sigma2), "mean ok": "yes" if mean_ok else "no",
            "var ok": "yes" if var_ok else "no"}


# --- the benchmark ---------------------------------------------------------------------------------------------

def run(repeats: int = 7, layers: int = LAYERS, records: list[int] | None = None, dg_samples: int = 2000,
        dg_sigmas: list[float] | None = None, seed: int = -1, std: float = 0.1) -> dict:
    """``seed`` < 0: a fresh key (as a site); >= 0: reproducible draws (same speed). ``std``: sigma x C."""
    rng = DpRandom(round_key(seed, "bench-noise"))
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(rng.keystream(8), "little"))

    gaussian, ms = [], {}
    for ffa in (True, False):
        shapes = adapter_shapes(layers, ffa)
        values = sum(math.prod(s) for s in shapes)
        mt = median_ms(partial(torch_noise, generator, shapes, std), repeats)
        cc = median_ms(partial(chacha_noise, rng, shapes, std), repeats)
        ms[ffa] = (cc, mt, values)
        gaussian.append({"trained": "B only (FFA)" if ffa else "A and B", "values": values, "tensors": len(shapes),
                         "torch MT ms": mt, "ChaCha20 ms": cc, "x MT": cc / mt, "extra ms/step": cc - mt})
    print(f"Gaussian noise per DP step ({layers} layers, r={RANK} q,v; median of {repeats}; "
          f"{torch.get_num_threads()} torch threads)")
    print(table(list(gaussian[0]), [list(r.values()) for r in gaussian]))

    poisson, mask_ms = [], {}
    for n in records or [STEP_RECORDS, 100_000]:
        q = min(1.0, 8 / n)
        mt = median_ms(partial(torch_mask, generator, n, q), repeats)
        cc = median_ms(partial(rng.bernoulli, n, q), repeats)
        mask_ms[n] = (cc, mt)
        poisson.append({"records": n, "torch MT ms": mt, "ChaCha20 ms": cc, "x MT": cc / mt, "extra ms/step": cc - mt})
    print("\nPoisson mask per DP step")
    print(table(list(poisson[0]), [list(r.values()) for r in poisson]))

    steps = []
    if layers == LAYERS:  # the recorded steps are of the whole 30-layer adapter
        n = STEP_RECORDS if STEP_RECORDS in mask_ms else min(mask_ms)
        for what, section, seconds, both in RECORDED_STEPS:
            cc, mt, values = ms[not both]
            total = cc + mask_ms[n][0]
            extra = total - mt - mask_ms[n][1]
            steps.append({"recorded DP step (BENCHMARKS.md)": f"{what}, section {section}", "s/step": seconds,
                          "values": values, "ChaCha20 noise + mask ms": total, "% of step": total / seconds / 10,
                          "extra vs MT, % of step": extra / seconds / 10})
        print(f"\nAgainst the SmolLM2 DP steps BENCHMARKS.md records (mask over {n} records)")
        print(table(list(steps[0]), [list(r.values()) for r in steps]))

    ints = KeystreamInts(rng)
    values = ms[True][2]
    chacha_us = 1000 * ms[True][0] / values
    discrete = [discrete_gaussian_row(s, dg_samples, ints, values, chacha_us) for s in dg_sigmas or [10.0, 0.5 * 2**16]]
    print(f"\nWhat an exact discrete Gaussian would cost per step (CKS 2020, fractions.Fraction, keystream integers; "
          f"ChaCha20 Box-Muller: {chacha_us:.3g} us/value)")
    print(table(list(discrete[0]), [list(r.values()) for r in discrete]))
    return {"gaussian": gaussian, "poisson": poisson, "steps": steps, "discrete_gaussian": discrete}
