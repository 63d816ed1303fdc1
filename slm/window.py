"""The window fitted to the data: how many tokens an example gets, and whether a label prompt lists the labels.

Why: a window fixed at 128 tokens cut every record of a 24-class label file to about 10 tokens
of text (the default template listed the 24 labels first), while a file of short sentences
paid for 128 tokens a step when 64 held them all. So ``model.max-length`` 0 means the smallest
multiple of ``STEP`` tokens that holds the ``QUANTILE`` example, at most
``model.max-length-cap`` (a scenario's memory and time); and ``data.label-list`` auto lists
the candidates only when the quantile example still fits with them: a list that does not fit
is dropped, never the text.

Fitted where the records are seen whole, before training: ``fedslm simulate`` and ``fedslm
data`` fit them from a sample of the whole file's training records and write the result into
the run config, so every client encodes alike and config.json records what was used. The
choice is made from the records and is not a DP release (in a simulation the file is the
researcher's). A deployed site never fits: with no file seen, 0 is the cap and the label list
is decided from the template alone (slm.tasks.label_template).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedslm.common.vocabulary import RunConfig
from slm.tasks import Task, encode

QUANTILE = 0.95  # the example the window must hold: longer ones (one in twenty) are cut, as encode says how
STEP = 16  # windows are multiples of this (a shape the kernels like; a record more or less changes nothing)
SMALLEST = 16  # fedslm.common.vocabulary.RANGES' floor for model.max-length
UNCUT = 10**9  # a window no record reaches: the whole example


@dataclass(frozen=True)
class Fit:
    """What was fitted, and from what, for the console line and the run config."""

    max_length: int
    label_list: str  # what data.label-list became (as configured, unless it was auto)
    sampled: int  # records measured
    quantile_tokens: int  # the QUANTILE example's tokens, with the prompt chosen
    fitted: bool  # model.max-length was 0 (else it was the user's)
    cap: int
    listed_tokens: int = 0  # a label list weighed and dropped: the QUANTILE example's tokens with it

    def settings(self) -> dict:
        return {"model.max-length": self.max_length, "data.label-list": self.label_list}

    def applied(self, specs: RunConfig) -> RunConfig:
        """``specs`` with the fitted window and label list."""
        return specs.changed("model", max_length=self.max_length).changed("task", label_list=self.label_list)

    def describe(self) -> str:
        held = f"{QUANTILE:.0%} of {self.sampled} sampled training records take at most {self.quantile_tokens}"
        if not self.fitted:
            said = f"{self.max_length} tokens (model.max-length)"
        elif self.max_length < self.cap or self.quantile_tokens <= self.cap:
            said = f"{self.max_length} tokens, fitted to the data ({held})"
        else:
            said = f"{self.max_length} tokens, model.max-length-cap ({held}: a larger cap cuts fewer)"
        if self.listed_tokens:
            said += (f"; the labels are not listed in the prompt (with them {QUANTILE:.0%} take up to "
                     f"{self.listed_tokens})")
        return said


def quantile_length(task: Task, tokenizer, records: list[dict]) -> int:
    """Tokens of the QUANTILE example, uncut (nearest rank)."""
    whole = replace(task, max_length=UNCUT)
    lengths = sorted(len(encode(whole, tokenizer, r, where="a training record").input_ids) for r in records)
    return lengths[max(0, math.ceil(QUANTILE * len(lengths)) - 1)]


def fit(specs: RunConfig, tokenizer, records: list[dict]) -> Fit:
    """The window and the label list for ``records`` (a sample of the training records, not empty)."""
    cap = specs.model.window
    task = Task.of(specs)
    label_list, listed_tokens = specs.task.label_list, 0
    if task.kind == "label" and not specs.task.prompt_template and label_list == "auto":
        listed_tokens = quantile_length(replace(task, prompt_template="", label_list="yes"), tokenizer, records)
        label_list = "yes" if listed_tokens <= cap else "no"
        listed_tokens = 0 if label_list == "yes" else listed_tokens
    chosen = Task.of(specs.changed("task", label_list=label_list))
    tokens = quantile_length(chosen, tokenizer, records)
    fitted = specs.model.max_length == 0
    window = min(cap, max(SMALLEST, math.ceil(tokens / STEP) * STEP)) if fitted else cap
    return Fit(max_length=window, label_list=label_list, sampled=len(records), quantile_tokens=tokens,
               fitted=fitted, cap=cap, listed_tokens=listed_tokens)
