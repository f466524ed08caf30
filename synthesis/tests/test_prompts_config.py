"""Prompt filling, answer parsing, condition sampling and configuration."""

from __future__ import annotations

import json
import pathlib
import random

import pytest

from reasonembed_jax.instructions import task_instruction
from remixer import prompts as P
from remixer.backends import chat_template_kwargs
from remixer.config import DEFAULT_CONFIG, ConfigError, load_config

TEMPLATES = {
    "domain_filter": {"domain_description", "passage"},
    "query_generation": {"task", "passage", "length", "education"},
    "relevance": {"relevance_definition", "query", "document"},
    "reasoning_query": {"query_kind", "query_kind_title", "query"},
}


def test_template_files_have_the_expected_placeholders():
    for name, expected in TEMPLATES.items():
        assert P.placeholders(P.load_template(name)) == expected, name


def test_fill_template_rejects_missing_and_unused_values():
    with pytest.raises(P.PromptError, match="missing"):
        P.fill_template("a {{x}} b {{y}}", x="1")
    with pytest.raises(P.PromptError, match="unused"):
        P.fill_template("a {{x}}", x="1", z="2")


def test_fill_template_inserts_values_verbatim():
    value = "code {{x}} {y} $z \\n"
    assert P.fill_template("<{{x}}>", x=value) == f"<{value}>"


def test_every_domain_fills_every_prompt():
    data = json.loads(P.DOMAINS_FILE.read_text())
    for key in data["domains"]:
        d = P.load_domain(key)
        texts = [P.filter_prompt(d, "PASSAGE-1"), P.query_prompt(d, "PASSAGE-2", "L", "E"),
                 P.relevance_prompt(d, "QUERY-3", "DOC-3"), P.reasoning_prompt(d, "QUERY-4")]
        for text in texts:
            assert "{{" not in text and "{name}" not in text, (key, text)
        assert "PASSAGE-2" in texts[1] and d.task in texts[1]
        assert "QUERY-3" in texts[2] and "DOC-3" in texts[2] and d.relevance in texts[2]
        assert d.instruction == task_instruction(key)  # the project's one table
    assert P.load_domain("earth_science").instruction.startswith("Given an Earth Science post")
    with pytest.raises(P.PromptError, match="unknown domain"):
        P.load_domain("no-such-domain")


def test_domains_file_instruction_only_for_domains_the_table_lacks(tmp_path):
    data = json.loads(P.DOMAINS_FILE.read_text())
    data["domains"]["nfcorpus"] = {"kind": "science", "name": "nutrition",
                                   "instruction": "Given a question, retrieve relevant documents."}
    data["domains"]["novel"] = {"kind": "science", "name": "nothing"}
    data["domains"]["biology"]["instruction"] = "Given a Biology post, find things."
    path = tmp_path / "domains.json"
    path.write_text(json.dumps(data))
    assert P.load_domain("nfcorpus", path).instruction == "Given a question, retrieve relevant " \
        "documents."
    with pytest.raises(P.PromptError, match="give it an 'instruction'"):
        P.load_domain("novel", path)
    with pytest.raises(P.PromptError, match="remove 'instruction' from the domains file"):
        P.load_domain("biology", path)


def test_query_prompt_carries_conditions():
    d = P.load_domain("leetcode")
    text = P.query_prompt(d, "def two_sum(...)", "200 to 300 words", "PhD")
    assert "Length: 200 to 300 words." in text
    assert "PhD education" in text
    assert "def two_sum(...)" in text


@pytest.mark.parametrize("answer, expected", [
    ("reasoning...\n<score>4</score>", 4),
    ("<score>2</score> then revised <score>5</score>", 5),
    ("<score> 3 </score>", 3),
    ("<SCORE>1</SCORE>", 1),
    ("<score>3.0</score>", 3),
    ("<score>3.5</score>", -1),
    ("<score>0</score>", -1),
    ("<score>6</score>", -1),
    ("<score>four</score>", -1),
    ("score: 4", -1),
    ("", -1),
    ("<think>maybe <score>5</score></think>final answer without tag", -1),
    ("<think>hmm</think><score>2</score>", 2),
    ("<think>ran out of tokens <score>5</score>", -1),
])
def test_parse_score(answer, expected):
    assert P.parse_score(answer) == expected


@pytest.mark.parametrize("answer, expected", [
    ("Yes", True), ("no.", False), ("**Yes** it fits", True), ("<think>no?</think>Yes", True),
    ("The answer is yes", True), ("it could be yes or no", None), ("perhaps", None), ("", None),
    ("Nope", None),
])
def test_parse_yes_no(answer, expected):
    assert P.parse_yes_no(answer) is expected


@pytest.mark.parametrize("raw, expected", [
    ('"How do moths navigate?"', "How do moths navigate?"),
    ("\u201cCurly quoted\u201d", "Curly quoted"),
    ("```\nSome problem text\n```", "Some problem text"),
    ("```markdown\nQuery: fenced and labelled\n```", "fenced and labelled"),
    ("**Query:** bold label", "bold label"),
    ("<think>plan the query</think>\n  Problem: real text  ", "real text"),
    ("keeps \"inner\" quotes", "keeps \"inner\" quotes"),
])
def test_clean_generated_text(raw, expected):
    assert P.clean_generated_text(raw) == expected


def test_condition_sampling_matches_the_weights():
    weights = DEFAULT_CONFIG["queries"]["length_weights"]
    rng = random.Random(0)
    n = 40_000
    counts = {k: 0 for k in weights}
    for _ in range(n):
        counts[P.weighted_choice(weights, rng)] += 1
    total = sum(weights.values())
    for label, w in weights.items():
        expected = w / total
        # 5 standard errors of a binomial proportion
        tol = 5 * (expected * (1 - expected) / n) ** 0.5
        assert abs(counts[label] / n - expected) < tol, (label, counts[label] / n, expected)
    assert list(weights.values()) == [1, 2, 3, 3, 2, 1]
    assert DEFAULT_CONFIG["queries"]["education_weights"] == {"high school": 1, "college": 2,
                                                               "PhD": 2}


def test_item_rng_depends_on_item_not_order():
    a = [P.item_rng(7, "query", i).random() for i in ("x", "y")]
    b = [P.item_rng(7, "query", i).random() for i in ("y", "x")]
    assert a == b[::-1]
    assert P.item_rng(8, "query", "x").random() != a[0]


def test_config_overrides_and_errors(tmp_path: pathlib.Path):
    cfg = load_config(None, ["queries.sampling.temperature=0.5",
                             "models.writer.model=/m/qwen", "models.writer.tensor_parallel_size=4",
                             "models.extra.model=/m/other", "annotation.model=extra",
                             'queries.education_weights={"PhD": 1}',
                             "models.writer.chat_template_kwargs.enable_thinking=false"])
    assert cfg["queries"]["sampling"]["temperature"] == 0.5
    assert cfg["models"]["writer"]["tensor_parallel_size"] == 4
    assert cfg["models"]["extra"]["backend"] == "vllm"  # completed from the model defaults
    assert cfg["queries"]["education_weights"] == {"PhD": 1}
    assert cfg["models"]["writer"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert cfg["models"]["embedder"]["runner"] == "pooling"
    with pytest.raises(ConfigError, match="unknown config key 'queries.temprature'"):
        load_config(None, ["queries.temprature=1"])
    with pytest.raises(ConfigError, match="names 'nope'"):
        load_config(None, ["queries.model=nope"])
    with pytest.raises(ConfigError, match="mode"):
        load_config(None, ["reasoning.mode=other"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"sources": {"min_char": 5}}')
    with pytest.raises(ConfigError, match="sources.min_char"):
        load_config(bad)
    good = tmp_path / "good.json"
    good.write_text('{"models": {"writer": {"backend": "openai", "base_url": "http://h:1/v1"}},'
                    ' "sources": {"sample_size": 5}}')
    cfg = load_config(good, ["sources.min_chars=10"])
    assert cfg["models"]["writer"]["backend"] == "openai"
    assert cfg["models"]["writer"]["max_retries"] == 4
    assert cfg["sources"] == {"min_chars": 10, "max_chars": 5000, "sample_size": 5}


def test_shipped_configs_load():
    folder = pathlib.Path(__file__).resolve().parents[1] / "configs"
    files = sorted(folder.glob("*.json"))
    assert files
    for path in files:
        load_config(path)


def test_thinking_is_off_by_default_and_a_config_choice():
    folder = pathlib.Path(__file__).resolve().parents[1] / "configs"
    for cfg in [load_config(None)] + [load_config(p) for p in sorted(folder.glob("*.json"))]:
        for stage in ("filter", "queries", "annotation", "reasoning"):
            model = cfg["models"][cfg[stage]["model"]]
            assert chat_template_kwargs(model, cfg[stage]["sampling"])["enable_thinking"] is \
                False, stage
    on = load_config(None, ["annotation.sampling.chat_template_kwargs.enable_thinking=true",
                            'models.judge.chat_template_kwargs={"foo": 1}'])
    judge = on["models"]["judge"]
    assert chat_template_kwargs(judge, on["annotation"]["sampling"]) == {
        "foo": 1, "enable_thinking": True}
    assert chat_template_kwargs(judge, on["reasoning"]["sampling"]) == {
        "foo": 1, "enable_thinking": False}  # the other stage keeps its own setting
