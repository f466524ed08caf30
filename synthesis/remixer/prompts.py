"""Prompt templates (files under ``prompts/``), per-domain wording, and answer parsing.

Templates use ``{{name}}`` placeholders; filling checks that the template's placeholders and the
given values match exactly, so a renamed placeholder fails loudly instead of leaking ``{{x}}``
into a prompt. Values are inserted verbatim (braces in a document are harmless).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import random
import re
from collections.abc import Mapping
from typing import Any

PROMPT_DIR = pathlib.Path(__file__).with_name("prompts")
DOMAINS_FILE = pathlib.Path(__file__).with_name("domains.json")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class PromptError(ValueError):
    """A template and its values do not match, or a domain is unknown."""


@functools.cache
def load_template(name: str) -> str:
    """The text of ``prompts/<name>.txt``."""
    path = PROMPT_DIR / f"{name}.txt"
    if not path.exists():
        raise PromptError(f"no prompt template {path}")
    return path.read_text(encoding="utf-8")


def placeholders(template: str) -> set[str]:
    return set(_PLACEHOLDER.findall(template))


def fill_template(template: str, **values: str) -> str:
    """Replaces every ``{{name}}`` with ``values[name]``; missing or unused values are errors."""
    wanted = placeholders(template)
    missing = wanted - values.keys()
    extra = values.keys() - wanted
    if missing or extra:
        raise PromptError(f"template placeholders {sorted(wanted)}; missing {sorted(missing)}, "
                          f"unused {sorted(extra)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


@dataclasses.dataclass(frozen=True)
class Domain:
    """The wording a domain's prompts and records use."""

    key: str
    name: str
    instruction: str
    description: str
    task: str
    relevance: str
    query_kind: str
    train_group_size: int | None
    batch_size: int | None


def domain_instruction(key: str, entry: Mapping[str, Any]) -> str:
    """The record prompt (query instruction) of a domain: the project's one table
    (``reasonembed_jax.instructions``) for a task it knows; a domain it does not know (in a
    user's own domains file) must give its ``instruction``."""
    from reasonembed_jax.instructions import TASKS, task_instruction

    if key in TASKS:
        if "instruction" in entry:
            raise PromptError(f"domain '{key}': its instruction comes from "
                              "reasonembed_jax/instructions.py; remove 'instruction' from the "
                              "domains file")
        return task_instruction(key)
    if not isinstance(entry.get("instruction"), str) or not entry["instruction"].strip():
        raise PromptError(f"domain '{key}' is not in reasonembed_jax/instructions.py: give it an "
                          "'instruction' in the domains file")
    return entry["instruction"]


def load_domain(key: str, domains_file: str | pathlib.Path | None = None) -> Domain:
    """Resolves a domain from ``domains.json`` (or another file of the same layout); its
    instruction from ``domain_instruction``."""
    data = json.loads(pathlib.Path(domains_file or DOMAINS_FILE).read_text(encoding="utf-8"))
    domains = data["domains"]
    if key not in domains:
        raise PromptError(f"unknown domain '{key}'; known: {sorted(domains)}")
    entry = domains[key]
    kind = data["kinds"][entry["kind"]]
    merged: dict[str, Any] = {**kind, **entry}
    name = merged["name"]
    sub = lambda text: text.replace("{name}", name)
    return Domain(
        key=key,
        name=name,
        instruction=domain_instruction(key, entry),
        description=sub(merged["description"]),
        task=sub(merged["task"]),
        relevance=sub(merged["relevance"]),
        query_kind=sub(merged["query_kind"]),
        train_group_size=merged.get("train_group_size"),
        batch_size=merged.get("batch_size"),
    )


def weighted_choice(weights: Mapping[str, float], rng: random.Random) -> str:
    """One label drawn with probability ``w / sum(w)``."""
    labels = list(weights)
    return rng.choices(labels, weights=[float(weights[k]) for k in labels], k=1)[0]


def item_rng(seed: int, *parts: object) -> random.Random:
    """A generator determined by ``seed`` and the item's identity (not by shard or order), so a
    resumed or re-sharded run draws exactly the same values."""
    return random.Random(f"{seed}:" + ":".join(str(p) for p in parts))


def filter_prompt(domain: Domain, passage: str) -> str:
    return fill_template(load_template("domain_filter"),
                         domain_description=domain.description, passage=passage)


def query_prompt(domain: Domain, passage: str, length: str, education: str) -> str:
    return fill_template(load_template("query_generation"), task=domain.task, passage=passage,
                         length=length, education=education)


def relevance_prompt(domain: Domain, query: str, document: str) -> str:
    return fill_template(load_template("relevance"), relevance_definition=domain.relevance,
                         query=query, document=document)


def clip_text(text: str, max_chars: int | None) -> str:
    """``text`` cut to at most ``max_chars`` characters at the last word boundary (hard cut when
    there is none), with ``...`` appended when anything was cut; unchanged for None."""
    if max_chars is None or len(text) <= max_chars:
        return text
    head = text[:max_chars]
    space = head.rfind(" ")
    return (head[:space] if space > 0 else head).rstrip() + " ..."


def reasoning_prompt(domain: Domain, query: str) -> str:
    kind = domain.query_kind
    return fill_template(load_template("reasoning_query"), query_kind=kind,
                         query_kind_title=kind[:1].upper() + kind[1:], query=query)


# ----------------------------------------------------------------------------- answer parsing

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_SCORE = re.compile(r"<score>\s*([+-]?\d+(?:\.\d+)?)\s*</score>", re.IGNORECASE)
_FENCE = re.compile(r"^```[\w+-]*[ \t]*\n?|\n?```$")
_LABEL = re.compile(r"^(?:\*\*)?(?:query|question|post|problem|instruction|request)"
                    r"(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def strip_thinking(text: str) -> str:
    """Drops ``<think>...</think>`` blocks; an unclosed ``<think>`` drops everything after it
    (the model ran out of tokens while thinking, so there is no answer)."""
    text = _THINK_BLOCK.sub("", text)
    lower = text.lower()
    if "<think>" in lower:
        text = text[: lower.index("<think>")]
    if "</think>" in text.lower():  # a template that opened the block inside the prompt
        text = text[text.lower().rindex("</think>") + len("</think>"):]
    return text.strip()


def parse_score(text: str, low: int = 1, high: int = 5) -> int:
    """The integer in the last ``<score>..</score>`` of the answer (after thinking), or -1 when
    there is none or it is not an integer in ``[low, high]``."""
    matches = _SCORE.findall(strip_thinking(text))
    if not matches:
        return -1
    raw = matches[-1]
    try:
        value = float(raw)
    except ValueError:
        return -1
    if not value.is_integer() or not low <= value <= high:
        return -1
    return int(value)


def parse_yes_no(text: str) -> bool | None:
    """True/False for a Yes/No answer; None when neither (or both) word is given."""
    answer = strip_thinking(text).strip().lower()
    first = re.match(r"^[\W_]*(yes|no)\b", answer)
    if first:
        return first.group(1) == "yes"
    words = set(re.findall(r"\b(yes|no)\b", answer))
    if len(words) == 1:
        return words.pop() == "yes"
    return None


def clean_generated_text(text: str) -> str:
    """Generated query cleanup: thinking removed, code fences, a leading label such as
    ``Query:`` and one pair of enclosing quotes stripped, whitespace trimmed."""
    out = strip_thinking(text).strip()
    for _ in range(3):  # labels, fences and quotes can nest in either order
        before = out
        out = _FENCE.sub("", out).strip()
        out = _LABEL.sub("", out).strip()
        if len(out) >= 2 and out[0] in _QUOTES and out[-1] == _QUOTES[out[0]]:
            out = out[1:-1].strip()
        if out == before:
            break
    return out


def normalize_for_dedup(text: str) -> str:
    """Lower case, whitespace collapsed: two texts equal under this are duplicates."""
    return " ".join(text.lower().split())
