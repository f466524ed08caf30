"""The one task-instruction table, against BRIGHT's official instruction configs, and every reader
of it (evaluation, training-record builders, shipped demo records, the synthesis domains).

The official configs (``bright/instruction_configs/<model>/<task>.json``) hold the sentence with
``{task}`` where the task's name goes (BRIGHT fills in the task id, e.g. ``earth_science``) and no
final full stop. ReasonEmbed's instruction is that sentence with the display name, the article
English needs before it, and a full stop: checked here word by word against the official text.
"""

import gzip
import json
import os
import pathlib
import re
import sys

import pytest

from reasonembed_jax.data import build_records
from reasonembed_jax.data.pipeline import DEMO_DATA_DIR
from reasonembed_jax.evaluation.datasets import bright_instruction
from reasonembed_jax.instructions import BRIGHT_TASKS, TASKS, canonical_task, task_instruction

CONFIG_MODELS = ("e5", "qwen", "qwen2", "sf")  # configs of the form "Instruct: ...\nQuery: "
_OURS = re.compile(r"^Given (a|an) (.+?) (post|question|problem), retrieve relevant (\w+) "
                   r"that help answer the \3\.$")


def official_sentence(config_dir, task: str, long_documents: bool) -> str | None:
    """The official query instruction (all model configs must agree), or None if the task has
    no such setting."""
    found = set()
    for model in CONFIG_MODELS:
        config = json.loads((config_dir / model / f"{task}.json").read_text())
        section = config.get("instructions_long" if long_documents else "instructions") or {}
        if section.get("query") is not None:
            found.add(section["query"].removeprefix("Instruct: ").removesuffix("\nQuery: "))
        else:
            found.add(None)
    assert len(found) == 1, f"{task}: official configs disagree: {found}"
    return found.pop()


def check_against_official(instruction: str, task: str, template: str) -> None:
    """``instruction`` is ``template`` with the display name for ``{task}``, the right article and
    a full stop; the display name spells the task id (case, spaces and underscores aside)."""
    match = _OURS.match(instruction)
    assert match, f"{task}: {instruction!r} is not a BRIGHT-style instruction"
    article, name = match.group(1), match.group(2)
    assert article == ("an" if name[0].lower() in "aeiou" else "a"), \
        f"{task}: wrong article in {instruction!r}"
    if "{task}" in template:
        assert name.lower().replace(" ", "") == task.replace("_", ""), (task, name)
        expected = template.replace("a {task}", f"{article} {name}")
    else:  # a fixed domain word ("coding", "Math"): only its case may differ
        expected = template
        assert re.search(rf"\ba {re.escape(name)} ", expected, re.IGNORECASE), (task, template)
        expected = re.sub(rf"\ba {re.escape(name)} ", f"{article} {name} ", expected,
                          flags=re.IGNORECASE)
    assert instruction == expected + ".", f"{task}: {instruction!r} vs official {template!r}"


@pytest.fixture(scope="module")
def config_dir(shared_data):
    return shared_data / "bright" / "instruction_configs"


@pytest.mark.parametrize("task", BRIGHT_TASKS)
def test_table_matches_official_bright_configs(config_dir, task):
    for long_documents in (False, True):
        template = official_sentence(config_dir, task, long_documents)
        if template is None:
            continue
        check_against_official(task_instruction(task, long_documents), task, template)
        # the evaluation reads the same table
        assert bright_instruction(task.replace("_", "-"), long_documents) == \
            task_instruction(task, long_documents)
    assert set(BRIGHT_TASKS) == {p.stem for p in (config_dir / "e5").glob("*.json")}


def test_known_sentences_and_bad_input():
    # the paper's released evaluation strings, written out
    assert task_instruction("earth-science") == (
        "Given an Earth Science post, retrieve relevant passages that help answer the post.")
    assert task_instruction("leetcode") == (
        "Given a Coding problem, retrieve relevant examples that help answer the problem.")
    assert task_instruction("economics", long_documents=True) == (
        "Given an Economics post, retrieve relevant documents that help answer the post.")
    assert task_instruction("scifact").startswith("Given a scientific claim")
    assert canonical_task(" Earth-Science ") == "earth_science" and "scifact" in TASKS
    with pytest.raises(ValueError, match="no instruction for task 'nfcorpus'"):
        task_instruction("nfcorpus")
    with pytest.raises(ValueError, match="no long-document setting"):
        task_instruction("scifact", long_documents=True)


def test_training_record_builders_use_the_table(config_dir, shared_data, tmp_path):
    # shipped demo records
    for name in sorted(f for f in os.listdir(DEMO_DATA_DIR) if f.endswith(".jsonl.gz")):
        task = name.removesuffix(".jsonl.gz")
        with gzip.open(os.path.join(DEMO_DATA_DIR, name), "rt") as f:
            prompts = {json.loads(line)["prompt"] for line in f}
        assert prompts == {task_instruction(task)}, name
        check_against_official(prompts.pop(), task, official_sentence(config_dir, task, False))
    # the bright builder's default, and a BEIR build with the table's instruction
    assert build_records.main(["bright", "--bright-dir", str(shared_data / "bright"),
                               "--out-dir", str(tmp_path), "--tasks", "earth-science",
                               "--max-queries", "2", "--num-negatives", "1"]) == 0
    with gzip.open(tmp_path / "earth_science.jsonl.gz", "rt") as f:
        assert {json.loads(line)["prompt"] for line in f} == {task_instruction("earth_science")}


def test_synthesis_domains_use_the_table(config_dir):
    """The synthesis package (no JAX) reads the same table: every domain's record prompt."""
    synthesis_dir = str(pathlib.Path(__file__).resolve().parents[1] / "synthesis")
    sys.path.insert(0, synthesis_dir)
    try:
        from remixer import prompts
    finally:
        sys.path.remove(synthesis_dir)
    domains = json.loads(prompts.DOMAINS_FILE.read_text())["domains"]
    assert set(domains) == set(TASKS)
    for key, entry in domains.items():
        assert "instruction" not in entry, key
        assert prompts.load_domain(key).instruction == task_instruction(key)
        if key in BRIGHT_TASKS:
            check_against_official(prompts.load_domain(key).instruction, key,
                                   official_sentence(config_dir, key, False))
