"""The three task kinds: how a record becomes tokens, which tokens carry loss, and what is measured.

- ``sft`` (instruction tuning): prompt through the chat template, then the response and
  the end-of-turn token. Only response tokens carry loss.
- ``label`` (label scoring): the prompt template filled with the text and the candidate
  words as the user turn, the verbalizer of the label as the assistant turn (loss on it
  only). Accuracy = argmax over labels of the log-likelihood of each verbalizer.
- ``next-word``: plain text, loss on every token; perplexity and next-token top-1/top-3.

Privacy unit: one encoded example = one record. Per-example loss is the mean over that
example's loss tokens, and a batch's loss is the mean of per-example losses, which is
what Opacus assumes with ``loss_reduction="mean"`` when it rescales per-sample gradients
(slm/batch.py turns examples into tensors and losses; this module imports no torch, so a
command checks a user's file and template before the seconds that importing torch takes).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from functools import lru_cache

from fedslm.common.errors import UserError
from fedslm.common.vocabulary import RunConfig

IGNORE = -100

# The user turn per task kind ({labels} = the verbalizer words, comma-separated).
# sft: the prompt alone, as the hospital demo was measured with (README numbers).
# label: the instruction first, naming the candidates, so that an instruct model puts its
# mass on the verbalizer words from round 0 and so that cutting a long text (from its end,
# see _label_prompt) never cuts the instruction. No "Answer:" cue: the chat template's
# assistant turn is where the answer goes.
DEFAULT_TEMPLATES = {"sft": "{prompt}", "label": "Classify the text into one of: {labels}.\n\nText: {text}"}
# The label default without the candidates, for when listing them leaves the text no room (data.label-list):
# with 24 labels the list took 118 of 128 tokens and the model saw 10 tokens of each text. Trained, the
# verbalizers are learnt from their loss; listed, an instruct model knows them from round 0.
UNLISTED_TEMPLATE = "Classify the text.\n\nText: {text}"
PLACEHOLDERS = {"sft": ("prompt",), "label": ("text", "labels")}


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    cut: bool = False  # the record did not fit model.max-length: its text was shortened (see encode)


@dataclass(frozen=True)
class Task:
    kind: str
    max_length: int
    prompt_field: str = "question"
    response_field: str = "answer"
    text_field: str = "text"
    label_field: str = "label"
    verbalizers: tuple[tuple[str, str], ...] = ()  # (label value, word)
    prompt_template: str = ""  # empty = the task's default (a label task's: see label_list)
    label_list: str = "yes"  # the default label template lists the candidates: yes, no, auto (see label_template)

    def __post_init__(self):
        if not self.prompt_template and self.kind == "sft":
            object.__setattr__(self, "prompt_template", DEFAULT_TEMPLATES["sft"])
        if not self.prompt_template and self.kind == "label" and self.label_list != "auto":
            template = DEFAULT_TEMPLATES["label"] if self.label_list == "yes" else UNLISTED_TEMPLATE
            object.__setattr__(self, "prompt_template", template)

    @classmethod
    def of(cls, specs: RunConfig) -> "Task":
        """The task of a run config; a label task's data.verbalizers must be resolved already
        (simulation.preflight from the whole file, client.data from a site's own records)."""
        keys, kind = specs.task, specs.task.task
        if kind == "label" and not keys.verbalizers.strip():
            raise UserError("config key 'data.verbalizers': empty; the labels are taken from the data file "
                            "before training (or give value=word pairs)")
        return cls(kind=kind, max_length=specs.model.window, prompt_field=keys.prompt_field,
                   response_field=keys.response_field, text_field=keys.text_field, label_field=keys.label_field,
                   verbalizers=parse_verbalizers(keys.verbalizers) if kind == "label" else (),
                   prompt_template=check_template(kind, keys.prompt_template), label_list=keys.label_list)

    @classmethod
    def from_config(cls, config: dict) -> "Task":
        """From a resolved flat config, for the rooms that do not pass typed specs yet."""
        return cls.of(RunConfig.parse(config))

    @property
    def words(self) -> str:
        """The candidate words as {labels} shows them."""
        return ", ".join(word for _, word in self.verbalizers)


def check_template(kind: str, template: str) -> str:
    """A data.prompt-template for ``kind``, checked: its placeholders are the task's own, its field is used.

    The template is the coordinator's, and ``str.format`` does more than substitute: a format spec
    (``{text:>100000000}``) makes the site build a string of any size per record, a conversion runs
    ``repr``/``ascii``, a lookup (``{text.__class__}``, ``{text[0]}``) reaches into objects. So a
    placeholder is a bare ``{name}``: nothing else passes.
    """
    if not template:
        return ""
    key = "config key 'data.prompt-template'"
    if kind not in PLACEHOLDERS:
        raise UserError(f"{key}: a {kind} task takes no prompt template (its text is the whole example)")
    known = PLACEHOLDERS[kind]
    try:
        parsed = [(name, conversion, spec) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:
        raise UserError(f"{key}: {err} (write a literal brace as {{{{ or }}}})") from None
    for name, conversion, spec in parsed:
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        shown = shown if len(shown) <= 60 else shown[:57] + "...}"
        why = ("looks up an attribute or index" if any(c in name for c in ".[") else
               "has a conversion" if conversion else "has a format spec" if spec else None)
        if why:
            raise UserError(f"{key}: {shown} {why}; write a placeholder as {{name}} only")
    fields = [name for name, _, _ in parsed]
    unknown = sorted({"{" + name + "}" for name in fields if name not in known})
    if unknown:
        raise UserError(f"{key}: unknown placeholder {', '.join(unknown)}; a {kind} task knows "
                        + ", ".join("{" + name + "}" for name in known))
    if known[0] not in fields:
        raise UserError(f"{key}: must contain {{{known[0]}}}")
    return template


# ---- verbalizers ------------------------------------------------------------------------
def parse_verbalizers(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        value, sep, word = item.partition("=")
        if not sep or not value.strip() or not word.strip():
            raise UserError(f"config key 'data.verbalizers': {item!r} is not value=word")
        pairs.append((value.strip(), word.strip()))
    if len(pairs) < 2:
        raise UserError("config key 'data.verbalizers': label scoring needs at least two value=word pairs")
    values = [value for value, _ in pairs]
    if len(set(values)) < len(values):
        raise UserError("config key 'data.verbalizers': a label value appears twice")
    return tuple(pairs)


def is_word(value: str) -> bool:
    """A label value usable as its own verbalizer: it has a letter, and no ',' or '=' (the pair syntax)."""
    return bool(re.search(r"[^\W\d_]", value)) and not re.search(r"[,=\n]", value)


def derive_verbalizers(values, where: str) -> str:
    """data.verbalizers from the label values found (``where`` names them): each word its own verbalizer.

    Sorted, so that every party that derives them from the same values scores the same
    candidates in the same order.
    """
    found = sorted({str(v).strip() for v in values})
    if len(found) < 2:
        raise UserError(f"{where}: label scoring needs at least two labels, found {', '.join(map(repr, found))}")
    not_words = [v for v in found if not is_word(v)]
    if not_words:
        example = ",".join(f"{v}=word{i}" for i, v in enumerate(not_words[:2]))
        if {"0", "1"} <= set(not_words):
            example = "0=negative,1=positive"
        raise UserError(f"config key 'data.verbalizers': labels {_listed(not_words)} in {where} are not words; "
                        f"give value=word pairs, e.g. {example}")
    return ",".join(f"{v}={v}" for v in found)


def uncovered(verbalizers: tuple[tuple[str, str], ...], values) -> list[str]:
    """Label values that have no verbalizer, sorted."""
    have = {value for value, _ in verbalizers}
    return sorted({str(v).strip() for v in values} - have)


def _listed(values: list[str], most: int = 12) -> str:
    shown = ", ".join(values[:most])
    return shown + (f" and {len(values) - most} more" if len(values) > most else "")


# ---- prompts ------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _system_turn(tokenizer) -> tuple:
    """The turns to put before a label prompt: an empty system turn where the chat template would
    otherwise inject its own default one (SmolLM2: "You are a helpful AI assistant named SmolLM,
    trained by Hugging Face", 16 tokens more than an empty system turn), else none."""
    user = [{"role": "user", "content": "x"}]
    plain = _chat(tokenizer, user)
    try:
        empty = _chat(tokenizer, [{"role": "system", "content": ""}, *user])
    except Exception:  # a template without a system role
        return ()
    return ({"role": "system", "content": ""},) if len(empty) < len(plain) else ()


def _chat(tokenizer, turns) -> list[int]:
    return list(tokenizer.apply_chat_template(list(turns), add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


@lru_cache(maxsize=8)
def _longest_completion(task: Task, tokenizer) -> int:
    return max(len(_completion_ids(tokenizer, word)) for _, word in task.verbalizers)


@lru_cache(maxsize=8)
def label_template(task: Task, tokenizer) -> str:
    """The user turn of a label task: its own template, or the default with or without the candidates.

    ``label_list`` auto, unresolved by a look at the data (simulation.preflight resolves it to
    yes or no from the whole file), is decided without records: the list is kept when the
    instruction with it leaves at least half the window to the text, so that a long list is
    dropped, never the text.
    """
    if task.prompt_template:
        return task.prompt_template
    listed = DEFAULT_TEMPLATES["label"].format(text="", labels=task.words)
    room = task.max_length - _longest_completion(task, tokenizer) - len(_chat(tokenizer, [
        *_system_turn(tokenizer), {"role": "user", "content": listed}]))
    return DEFAULT_TEMPLATES["label"] if room >= task.max_length // 2 else UNLISTED_TEMPLATE


def _label_prompt(task: Task, tokenizer, text: str) -> tuple[list[int], bool]:
    """The filled template, its text cut from the end so that prompt + longest verbalizer fit.

    Every candidate of a record then has the same prompt (label scoring compares them), and
    the instruction and candidate words are never cut.
    """
    system = _system_turn(tokenizer)
    budget = task.max_length - _longest_completion(task, tokenizer)
    template = label_template(task, tokenizer)

    def render(body: str) -> list[int]:
        content = template.format(text=body, labels=task.words)
        return _chat(tokenizer, [*system, {"role": "user", "content": content}])

    ids = render(text)
    if len(ids) <= budget:
        return ids, False
    fixed = len(render(""))
    if fixed >= budget:
        raise UserError(f"config key 'model.max-length': {task.max_length} tokens leave no room for the text "
                        f"(the prompt template with its labels takes {fixed}, the longest verbalizer "
                        f"{task.max_length - budget}); raise it or shorten data.prompt-template")
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(text_ids) - (len(ids) - budget)
    while keep > 0:  # decoding a cut may re-tokenize a little longer: shrink until it fits
        ids = render(tokenizer.decode(text_ids[:keep]))
        if len(ids) <= budget:
            return ids, True
        keep -= len(ids) - budget
    return render(""), True


CUT_MARK = " … "  # where an SFT prompt's user text was shortened


def _sft_prompt(task: Task, tokenizer, text: str) -> tuple[list[int], bool]:
    """The chat-formatted instruction, its user text cut in the MIDDLE so that it takes at most half the window.

    Half the window stays for the response, which alone carries loss; the chat template (system
    and user headers), the template's own words and the text's start and end are kept: cutting
    the prompt's start (as before) dropped ``<|im_start|>user`` and the instruction itself. When
    the template alone needs more than half, the prompt takes what it needs plus up to 8 text
    tokens, leaving the response at least 2.
    """
    def render(body: str) -> list[int]:
        return _chat(tokenizer, [{"role": "user", "content": task.prompt_template.format(prompt=body)}])

    ids = render(text)
    if len(ids) <= task.max_length // 2:  # most records: one render, nothing else
        return ids, False
    fixed = len(render(CUT_MARK))
    if fixed + 2 > task.max_length:  # the template, one response token and the end of turn
        raise UserError(f"config key 'model.max-length': {task.max_length} tokens leave no room for an SFT "
                        f"record (the chat template and data.prompt-template take {fixed}); raise it")
    budget = max(task.max_length // 2, fixed + min(8, task.max_length - 2 - fixed))
    if len(ids) <= budget:
        return ids, False
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = len(text_ids) - (len(ids) - budget) - 1
    while keep > 0:  # decoding a cut may re-tokenize a little longer: shrink until it fits
        head = (keep + 1) // 2
        tail = text_ids[len(text_ids) - (keep - head):] if keep > head else []
        ids = render(tokenizer.decode(text_ids[:head]) + CUT_MARK + tokenizer.decode(tail))
        if len(ids) <= budget:
            return ids, True
        keep -= len(ids) - budget
    return render(CUT_MARK), True


def prompt_ids(task: Task, tokenizer, record: dict, where: str = "") -> list[int]:
    """The tokens before the completion: the same for every candidate label of a record."""
    return _prompt(task, tokenizer, record, where)[0]


def _prompt(task: Task, tokenizer, record: dict, where: str) -> tuple[list[int], bool]:
    """(the prompt's tokens, whether its text was cut to fit)."""
    if task.kind == "sft":
        return _sft_prompt(task, tokenizer, _value(record, task.prompt_field, where))
    if task.kind == "label":
        return _label_prompt(task, tokenizer, _value(record, task.text_field, where))
    raise ValueError(f"a {task.kind} task has no prompt")


def _completion_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _value(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"record {where}: field '{field}' is empty")
    return str(value)


def encode(task: Task, tokenizer, record: dict, where: str = "") -> Example:
    """One record -> token ids and loss labels, at most ``task.max_length`` tokens.

    What does not fit is cut, and the example says so (``cut``): next-word text and an SFT
    response at their end, an SFT prompt in the middle of its user text (``_sft_prompt``),
    a label text at its end (``_label_prompt``; the labels and instruction are kept).
    """
    if task.kind == "next-word":
        ids = tokenizer(_value(record, task.text_field, where), add_special_tokens=False)["input_ids"]
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
        return Example(ids[: task.max_length], [IGNORE] + ids[1: task.max_length], cut=len(ids) > task.max_length)
    if task.kind == "sft":
        completion = _value(record, task.response_field, where)
    else:
        completion = verbalize(task, record, where)
    prompt, cut = _prompt(task, tokenizer, record, where)
    return _with_completion(task, prompt, _completion_ids(tokenizer, completion), cut)


def encode_candidates(task: Task, tokenizer, record: dict, where: str = "") -> list[Example]:
    """A label record encoded with each verbalizer as its completion, in task.verbalizers order.

    The same examples as ``encode`` of the record with each label value, but the prompt (chat
    template and all) is built once: label scoring runs K candidates per record.
    """
    prompt, cut = _prompt(task, tokenizer, record, where)
    return [_with_completion(task, prompt, _completion_ids(tokenizer, word), cut) for _, word in task.verbalizers]


def _with_completion(task: Task, prompt: list[int], completion_ids: list[int], prompt_cut: bool = False) -> Example:
    kept = completion_ids[: task.max_length - len(prompt)]
    return Example(prompt + kept, [IGNORE] * len(prompt) + kept, cut=prompt_cut or len(kept) < len(completion_ids))


def verbalize(task: Task, record: dict, where: str) -> str:
    value = _value(record, task.label_field, where).strip()
    for label, word in task.verbalizers:
        if label == value:
            return word
    raise UserError(f"record {where}: label {value!r} has no verbalizer in data.verbalizers")


def summarize(loss_sum: float, tokens: int) -> dict[str, float]:
    mean = loss_sum / max(tokens, 1)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}
