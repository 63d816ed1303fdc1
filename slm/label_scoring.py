"""Label scoring from one pass over each prompt: the log-likelihood of every verbalizer.

A K-label record used to be run K times, each time as a full sequence with
full-vocabulary logits at every position (measured on SmolLM2: 4.6 s per record of a
24-label task). The K candidates (the record encoded by ``slm.tasks.encode`` with each
label value) share a prefix, usually the whole prompt. Here that prefix runs once with
``use_cache=True``; the K candidates' continuations then run as ONE packed row on that
cache, each seeing the prefix and its own earlier tokens only (a block-diagonal causal
mask, at the candidates' true positions: no padding between candidates and no copy of
the cache per candidate); and the vocabulary projection is applied only to the hidden
states that predict a scored token (the verbalizer's tokens and the end-of-turn token
after it). A verbalizer's last input token is its end-of-turn token, which predicts
nothing scored, so it is not run at all.

Exactness. Causal attention makes a position's hidden state depend on the tokens before
it only, so the prefix's states and cache are the ones each full candidate would compute;
a packed continuation token attends to exactly the keys it would see in its full
sequence (the prefix, padding masked out, and its candidate's earlier tokens), with the
same rotary positions. The log-likelihoods equal the full-sequence ones up to
floating-point summation order (tests/slm/test_label_scoring.py compares against the
K-pass reference). The shared prefix is computed from the candidates' token ids, never
assumed, so it follows whatever prompt encoding ``slm.tasks`` produces (truncation,
templates, verbalizers that share their first tokens). Logits = lm_head(final hidden state), optionally soft-capped
(``final_logit_softcapping``): the Llama family and most causal LMs; a model that scales
its logits in other ways would need that step here too.

Several records go through together (right-padded: a padded query still attends to its
record's real tokens, so no attention row is fully masked), sorted by prefix length to
waste little on padding (the packed continuations of all records are alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from slm.batch import collate, token_losses
from slm.frozen_prefix import cut, kept_rows, layer_range
from slm.tasks import IGNORE, Example, Task, encode_candidates, verbalize
from slm.unwrap import causal_lm


@dataclass(frozen=True)
class LabelScores:
    """Per record: the summed log-likelihood of each verbalizer (its tokens + end-of-turn)."""

    log_likelihoods: torch.Tensor  # (R, K), fp32
    truth: list[int]  # index of each record's true label among task.verbalizers
    tokens: list[list[int]]  # (R, K): scored tokens of each candidate

    @property
    def answers(self) -> list[int]:
        return self.log_likelihoods.argmax(dim=1).tolist()

    def accuracy(self) -> float:
        return sum(a == t for a, t in zip(self.answers, self.truth)) / max(len(self.truth), 1)

    def true_loss(self) -> tuple[float, int]:
        """(summed loss, tokens) over the true verbalizers: the eval loss of a label task."""
        rows = range(len(self.truth))
        return (-float(sum(self.log_likelihoods[r, self.truth[r]] for r in rows)),
                sum(self.tokens[r][self.truth[r]] for r in rows))


@dataclass(frozen=True)
class _Record:
    """One record's candidates, split at their shared prefix."""

    prefix: list[int]
    # per candidate: the inputs after the prefix whose hidden states are needed, and the
    # scored tokens as (position of the predicting hidden state, target token)
    suffixes: list[list[int]]
    scored: list[list[tuple[int, int]]]


def candidates(task: Task, tokenizer, record: dict, where: str = "") -> tuple[list[Example], int]:
    """(the record encoded with each label value, the index of its true label)."""
    verbalize(task, record, where)  # a label without a verbalizer is the user's error, named here
    values = [value for value, _ in task.verbalizers]
    return encode_candidates(task, tokenizer, record, where), values.index(str(record[task.label_field]).strip())


def _split(examples: list[Example]) -> _Record:
    shared = 0
    for column in zip(*(e.input_ids for e in examples)):
        if any(token != column[0] for token in column):
            break
        shared += 1
    if shared == 0:
        raise ValueError("label candidates share no first token: nothing to run once")
    scored = [[(t - 1, e.input_ids[t]) for t in range(1, len(e.input_ids)) if e.labels[t] != IGNORE]
              for e in examples]
    # A candidate needs its inputs from the prefix up to its last predicting position only:
    # the final token (end-of-turn) is scored but predicts nothing that is.
    last = [max((s for s, _ in pairs), default=-1) for pairs in scored]
    suffixes = [e.input_ids[shared : max(shared, end + 1)] for e, end in zip(examples, last)]
    return _Record(examples[0].input_ids[:shared], suffixes, scored)


def _body_and_head(model):
    """The transformer body (tokens -> final hidden states) and the vocabulary projection."""
    core = causal_lm(model)  # PEFT: LoRA layers stay injected
    return core.get_decoder(), core.get_output_embeddings(), getattr(core.config, "final_logit_softcapping", None)


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _continuation_mask(group: list[_Record], prefix_mask: torch.Tensor, packed: list[list[int]],
                       dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (B, 1, L, P + L) of the packed continuations over the prefix cache.

    Each packed token sees its record's prefix (padding masked) and the earlier tokens of
    its own candidate only: the attention a candidate's full sequence would have. Padding
    queries see the prefix, so no row is fully masked.
    """
    width = max(len(row) for row in packed)
    segment = torch.full((len(group), width), -1, dtype=torch.long)  # candidate of each packed token, -1 = padding
    for b, record in enumerate(group):
        offset = 0
        for c, suffix in enumerate(record.suffixes):
            segment[b, offset : offset + len(suffix)] = c
            offset += len(suffix)
    index = torch.arange(width)
    own = (segment[:, :, None] == segment[:, None, :]) & (index[None, None, :] <= index[None, :, None])
    own &= segment[:, None, :] >= 0  # (B, L, L)
    allowed = torch.cat([prefix_mask.bool()[:, None, :].expand(-1, width, -1), own], dim=2)  # (B, L, P + L)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _positions(group: list[_Record], like: torch.Tensor) -> torch.Tensor:
    """The true position of every packed continuation token (after its record's prefix)."""
    positions = torch.zeros_like(like)
    for b, record in enumerate(group):
        p, offset = len(record.prefix), 0
        for suffix in record.suffixes:
            positions[b, offset : offset + len(suffix)] = torch.arange(p, p + len(suffix))
            offset += len(suffix)
    return positions


def _two_passes(body, prefix: dict, mask: torch.Tensor, cont: dict | None, attention, positions):
    """(prefix hidden (B, P, H), continuation hidden (B, L, H) or None): pass 1 with a KV cache, pass 2 on it.

    ``prefix`` / ``cont`` hold the inputs: ``input_ids``, or ``inputs_embeds`` from the frozen layers.
    """
    out = body(**prefix, attention_mask=mask, use_cache=True)
    if cont is None:
        return out.last_hidden_state, None
    after = body(**cont, attention_mask=attention, position_ids=positions, past_key_values=out.past_key_values,
                 use_cache=True).last_hidden_state
    return out.last_hidden_state, after


def _frozen_part(model, at: int, group: list[_Record], ids, mask, cont_ids, attention, positions):
    """The hidden states entering layer ``at`` of both passes, kept per group of records (slm.frozen_prefix):
    the frozen layers below the adapters run once per record, not once per evaluation."""
    body, cache = causal_lm(model).get_decoder(), kept_rows(model)
    key = ("label-scoring", at, *((tuple(r.prefix), tuple(map(tuple, r.suffixes))) for r in group))
    kept = cache.get(key)
    if kept is None:
        with layer_range(body, 0, at, final_norm=False):
            kept = _two_passes(body, {"input_ids": ids}, mask, None if cont_ids is None else {"input_ids": cont_ids},
                               attention, positions)
        cache.put(key, kept)
    return kept


@torch.no_grad()
def _score_group(model, group: list[_Record], pad_id: int) -> list[list[float]]:
    """Log-likelihoods (per record, per candidate) of a group of records.

    Pass 1: the prefixes, right-padded, with use_cache=True. Pass 2: each record's
    candidate continuations packed into one row (no padding between candidates, no copy of
    the cache per candidate), at their true positions, under _continuation_mask. With
    adapters in the top layers only (lora.layers), both passes start from the kept output
    of the frozen layers below them.
    """
    body, head, softcap = _body_and_head(model)
    device = next(model.parameters()).device  # model.device: a site's GPU
    ids, mask = _right_pad([r.prefix for r in group], pad_id)  # (B, P)
    ids, mask = ids.to(device), mask.to(device)
    packed = [[token for suffix in r.suffixes for token in suffix] for r in group]
    width = max(1, max(len(row) for row in packed))
    cont_ids = attention = positions = None
    if any(packed):
        cont_ids, _ = _right_pad(packed, pad_id)  # (B, L)
        positions = _positions(group, cont_ids).to(device)
        dtype = body.get_input_embeddings()(ids[:1, :1]).dtype  # the hidden states' dtype (bf16 base: bf16)
        attention = _continuation_mask(group, mask.cpu(), packed, dtype).to(device)
        cont_ids = cont_ids.to(device)
    at = cut(model)
    if at:
        frozen_prefix, frozen_cont = _frozen_part(model, at, group, ids, mask, cont_ids, attention, positions)
        with layer_range(body, at):
            prefix_hidden, cont = _two_passes(body, {"inputs_embeds": frozen_prefix}, mask,
                                              None if frozen_cont is None else {"inputs_embeds": frozen_cont},
                                              attention, positions)
    else:
        prefix_hidden, cont = _two_passes(body, {"input_ids": ids}, mask,
                                          None if cont_ids is None else {"input_ids": cont_ids}, attention, positions)
    sources = [prefix_hidden.reshape(-1, prefix_hidden.size(-1))]  # flat rows: prefixes, then continuations
    if cont is not None:
        sources.append(cont.reshape(-1, cont.size(-1)))
    prefix_rows, k = prefix_hidden.size(0) * prefix_hidden.size(1), len(group[0].suffixes)
    source, target, owner = [], [], []  # per scored token: flat hidden-state row, token, record * K + candidate
    for b, record in enumerate(group):
        p, offset = len(record.prefix), 0
        for c, (suffix, pairs) in enumerate(zip(record.suffixes, record.scored)):
            for s, token in pairs:
                source.append(b * prefix_hidden.size(1) + s if s < p else prefix_rows + b * width + offset + s - p)
                target.append(token)
                owner.append(b * k + c)
            offset += len(suffix)
    rows, where = torch.unique(torch.tensor(source, dtype=torch.long), return_inverse=True)  # a state once
    logits = head(torch.cat(sources)[rows.to(device)]).float().cpu()  # (M, V): only the states that predict a scored token
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    picked = torch.log_softmax(logits, dim=-1)[where, torch.tensor(target, dtype=torch.long)]  # (N,)
    sums = torch.zeros(len(group) * k).index_add_(0, torch.tensor(owner, dtype=torch.long), picked)
    return sums.view(len(group), k).tolist()


@torch.no_grad()
def score_labels(model, tokenizer, task: Task, records: list[dict], batch_size: int = 8,
                 on_progress: Callable[[int, int], None] | None = None) -> LabelScores:
    """Every verbalizer's log-likelihood for every record, about one forward pass of each prompt.

    ``batch_size`` records go through together; ``on_progress(done, total)`` is called
    after each group.
    """
    was_training = model.training
    model.eval()
    try:
        encoded = [candidates(task, tokenizer, r, where=f"#{i}") for i, r in enumerate(records)]
        split = [_split(examples) for examples, _ in encoded]
        k = len(task.verbalizers)
        per_group = max(1, batch_size)
        order = sorted(range(len(split)), key=lambda i: len(split[i].prefix))  # little padding per group
        scores: list[list[float]] = [[] for _ in split]
        for start in range(0, len(order), per_group):
            chosen = order[start : start + per_group]
            for i, row in zip(chosen, _score_group(model, [split[i] for i in chosen], tokenizer.pad_token_id)):
                scores[i] = row
            if on_progress is not None:
                on_progress(min(start + per_group, len(order)), len(order))
        return LabelScores(log_likelihoods=torch.tensor(scores, dtype=torch.float32).reshape(len(records), k),
                           truth=[truth for _, truth in encoded],
                           tokens=[[len(pairs) for pairs in s.scored] for s in split])
    finally:
        model.train(was_training)


@torch.no_grad()
def reference_scores(model, tokenizer, task: Task, records: list[dict]) -> torch.Tensor:
    """The definition, K full passes per record: (R, K) log-likelihoods.

    Each candidate runs as a whole sequence with full-vocabulary logits at every position,
    as evaluation did before score_labels. Kept as the reference that the fast scorer is
    tested (tests/slm/test_label_scoring.py) and benchmarked (``python -m benchmarks label-scoring``)
    against; evaluation never calls it.
    """
    rows = []
    for i, record in enumerate(records):
        examples, _ = candidates(task, tokenizer, record, where=f"#{i}")
        batch = collate(examples, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, _ = token_losses(logits, batch["labels"])
        rows.append(-losses.sum(dim=1))  # (K,)
    return torch.stack(rows) if rows else torch.zeros((0, len(task.verbalizers)))
