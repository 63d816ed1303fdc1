"""Canaries for the empirical audit: random secrets as SFT records, and how much a model leaks them.

A canary is one training record, prompt "Patient <KEY>: what is the access code?" and
response "<SECRET>", with KEY four random capital letters (distinct across canaries) and
SECRET ``digits`` random decimal digits, drawn from a seeded generator. The secret is
the only part with loss, as for any SFT record. Each canary is included in the canary
client's training data independently with probability 1/2 (a second seeded stream), as
the one-run audit requires (privacy.audit.one_run_bound). Each canary is ONE record, inserted
at most once: the unit DP protects.

Two measurements of a trained adapter:

- membership score (``score_canaries``): the digit log-likelihood ratio, how much more
  likely the model finds each of the canary's digits than the average digit, at the
  same place of the same record. It needs nothing but the trained adapter and the
  canary. The plain loss is noisier: learning that codes are 8 digits lowers the loss of
  every canary, in or out, and a canary's loss also depends on how typical its digits
  are. On SmolLM2 (128 canaries, sigma = 0) the digit score proved eps >= 0.97 after 80
  steps where the plain loss proved 0.67; after 160 steps both separate completely.
- exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019):
  exposure = log2 |R| - log2 rank, where R is the space of secrets (10^digits) and rank
  the canary's position when every secret in R, put in the same record, is sorted by
  log-perplexity (-log2 P(response | prompt), lower first). R is too large to score, so
  ``n`` secrets are sampled uniformly from R:
  * sampled: exposure ~ -log2((c + 1) / (n + 1)), c = sampled secrets with log-perplexity
    <= the canary's (its rank among itself and the sample, as a fraction of the sample);
    it cannot exceed log2(n + 1);
  * extrapolated (the paper's approximation by distribution modeling): a skew-normal fitted to the
    sampled log-perplexities stands for the whole of R, and exposure = -log2 CDF(canary's
    log-perplexity), capped at log2 |R|.
  A secret the model has not seen has exposure about log2(e) = 1.44 bits on average.
"""

from __future__ import annotations

import math
import random
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slm.batch import collate, per_example_loss
from slm.tasks import IGNORE, Task, encode

PROMPT = "Patient {key}: what is the access code?"
KEY_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O: never mistaken for digits
KEY_LENGTH = 4


@dataclass(frozen=True)
class CanarySet:
    keys: tuple[str, ...]
    secrets: tuple[str, ...]
    included: tuple[bool, ...]
    digits: int
    seed: int

    @property
    def space_log2(self) -> float:
        """log2 |R|: the secrets are ``digits`` uniform decimal digits."""
        return self.digits * math.log2(10)

    def prompt(self, i: int) -> str:
        return PROMPT.format(key=self.keys[i])

    def record(self, task: Task, i: int, secret: str | None = None) -> dict:
        """Canary ``i`` as a record of ``task`` (its own secret unless another is given)."""
        return {task.prompt_field: self.prompt(i), task.response_field: self.secrets[i] if secret is None else secret}

    def inserted(self) -> list[int]:
        return [i for i, inc in enumerate(self.included) if inc]


def make_canaries(m: int, *, digits: int, seed: int) -> CanarySet:
    """``m`` canaries; which go in is drawn independently of the secrets (separate streams)."""
    if m < 2 or digits < 1:
        raise ValueError(f"need at least 2 canaries and 1 digit, got {m} and {digits}")
    if m > len(KEY_LETTERS) ** KEY_LENGTH // 4:
        raise ValueError(f"{m} canaries: too many for distinct {KEY_LENGTH}-letter keys")
    draw = random.Random(f"fedslm-canaries/{seed}")
    keys: list[str] = []
    while len(keys) < m:
        key = "".join(draw.choice(KEY_LETTERS) for _ in range(KEY_LENGTH))
        if key not in keys:
            keys.append(key)
    secrets = tuple(random_secret(draw, digits) for _ in range(m))
    coin = random.Random(f"fedslm-inclusion/{seed}")
    included = tuple(coin.random() < 0.5 for _ in range(m))
    return CanarySet(tuple(keys), secrets, included, digits, seed)


def random_secret(draw: random.Random, digits: int) -> str:
    return "".join(draw.choice("0123456789") for _ in range(digits))


DIGITS = "0123456789"


def digit_token_ids(tokenizer) -> dict[str, int]:
    """Each decimal digit's token id; the audit needs one token per digit (Llama-family tokenizers split them)."""
    ids = {}
    for d in DIGITS:
        tokens = tokenizer(d, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"the tokenizer does not give digit {d!r} a token of its own; the audit's secrets "
                             "need one token per digit")
        ids[d] = tokens[0]
    return ids


@torch.no_grad()
def score_canaries(model, tokenizer, task: Task, canaries: CanarySet, batch_size: int = 32,
                   ) -> tuple[list[float], list[float]]:
    """(loss, membership score) of every canary, from one forward pass each.

    loss: the training objective (mean over the response tokens). score: the digit
    log-likelihood ratio, mean over the secret's digits of log p(its digit) minus the
    mean of log p(d) over the ten digits d, given the record and the digits before it
    (nats). A model that never saw the secret cannot prefer its digits: the score is 0
    in expectation, however well it has learned that codes are digits (which lowers
    every canary's loss alike); a memorized secret scores high.
    """
    digit_ids = digit_token_ids(tokenizer)
    every_digit = torch.tensor(list(digit_ids.values()))
    was_training = model.training
    model.eval()
    try:
        examples = [encode(task, tokenizer, canaries.record(task, i), where=f"canary #{i}")
                    for i in range(len(canaries.keys))]
        losses: list[float] = []
        scores: list[float] = []
        for first in range(0, len(examples), batch_size):
            chunk = examples[first:first + batch_size]
            batch = collate(chunk, tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses.extend(per_example_loss(logits, batch["labels"]).tolist())
            for row, (example, i) in enumerate(zip(chunk, range(first, first + len(chunk)))):
                start = next(j for j, label in enumerate(example.labels) if label != IGNORE)
                truth = [digit_ids[c] for c in canaries.secrets[i]]
                if example.input_ids[start:start + len(truth)] != truth:
                    raise ValueError(f"canary #{i}: its secret is not tokenized one token per digit")
                # position p predicts token p + 1: the digits are predicted from start - 1 on
                logp = torch.log_softmax(logits[row, start - 1:start - 1 + len(truth)].float(), dim=-1)
                mine = logp[torch.arange(len(truth)), torch.tensor(truth)]
                scores.append(float((mine - logp[:, every_digit].mean(dim=1)).mean()))
        return losses, scores
    finally:
        model.train(was_training)


@torch.no_grad()
def log_perplexities(model, tokenizer, task: Task, prompt_record: dict, secrets: Sequence[str],
                     batch_size: int = 64) -> list[float]:
    """-log2 P(response | prompt) of each secret put into the same record (Carlini et al.'s Px).

    The records differ only after the prompt, so the prompt runs once per batch and its
    key/value cache is shared by the candidates (about 5x less work than whole records
    for SmolLM2's chat template). Responses are right-padded: under causal attention a
    real token never sees the padding after it, and padded positions carry no loss.
    """
    was_training = model.training
    model.eval()
    try:
        examples = [encode(task, tokenizer, {**prompt_record, task.response_field: s}) for s in secrets]
        start = next(j for j, label in enumerate(examples[0].labels) if label != IGNORE)  # first response token
        prefix = examples[0].input_ids[:start]
        if any(e.input_ids[:start] != prefix or e.labels[start - 1] != IGNORE for e in examples):
            raise ValueError("candidate records do not share the canary's prompt tokens")
        out: list[float] = []
        for first in range(0, len(examples), batch_size):
            chunk = [e.input_ids[start:] for e in examples[first:first + batch_size]]
            head = model(input_ids=torch.tensor([prefix]), use_cache=True, logits_to_keep=1)
            cache = head.past_key_values
            cache.batch_repeat_interleave(len(chunk))
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, c in enumerate(chunk):
                ids[row, :len(c)] = torch.tensor(c)
                mask[row, :len(c)] = True
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits  # (B, L, V)
            # token 0 of each response is predicted by the prompt's last position, token j by position j-1
            logits = torch.cat([head.logits[:, -1:, :].expand(len(chunk), 1, -1), logits[:, :-1, :]], dim=1)
            nats = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")
            out.extend(((nats * mask).sum(dim=1) / math.log(2)).tolist())
        return out
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Exposure:
    sampled: float
    extrapolated: float
    log_perplexity: float  # the canary's, in bits
    candidates: int


def exposure(canary_px: float, candidate_px: Sequence[float], space_log2: float) -> Exposure:
    """Sampled and skew-normal-extrapolated exposure of one canary (module docstring)."""
    n = len(candidate_px)
    if n < 2:
        raise ValueError("exposure needs at least 2 sampled candidates")
    at_or_below = sum(px <= canary_px for px in candidate_px)
    sampled = math.log2(n + 1) - math.log2(at_or_below + 1)
    return Exposure(sampled, _extrapolated(canary_px, candidate_px, space_log2), canary_px, n)


def _extrapolated(canary_px: float, candidate_px: Sequence[float], space_log2: float) -> float:
    from scipy import stats

    if statistics.pstdev(candidate_px) == 0:
        return space_log2 if canary_px < candidate_px[0] else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's optimizer warns on flat likelihood regions
        shape, loc, scale = stats.skewnorm.fit(candidate_px)
        log_cdf = float(stats.skewnorm.logcdf(canary_px, shape, loc, scale))
    return min(max(-log_cdf / math.log(2), 0.0), space_log2)


def candidate_secrets(canaries: CanarySet, i: int, n: int) -> list[str]:
    """``n`` secrets uniform over R for canary ``i``, none equal to a canary's own secret."""
    draw = random.Random(f"fedslm-candidates/{canaries.seed}/{i}")
    taken, out = set(canaries.secrets), []
    while len(out) < n:
        secret = random_secret(draw, canaries.digits)
        if secret not in taken:
            out.append(secret)
    return out


def summarize(values: Sequence[float]) -> dict:
    """count / mean / median / min / max (None when there is nothing to summarize)."""
    if not values:
        return {"count": 0, "mean": None, "median": None, "min": None, "max": None}
    return {"count": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}
