"""The ``README.md`` model card every HF export carries (Hugging Face convention: YAML front matter,
then Markdown): what the model is, how it was trained (resolved config, data, steps, final loss,
evaluation), the query format, and how to use it.

``run`` (optional, from the trainer) holds::

    {"base_model": str, "license": str | None, "config": dict (resolved training config),
     "data": [{"domain", "records", "group_size", "batch_size"}], "data_sources": [str],
     "steps": int, "final_loss": float, "eval": {metric: value} | None}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from reasonembed_jax.text import QUERY_TEMPLATE

CARD_FILE = "README.md"


def base_model_license(hf_dir: str | os.PathLike | None) -> str | None:
    """The ``license:`` of the base model's own card front matter, if it has one."""
    if not hf_dir:
        return None
    path = os.path.join(os.fspath(hf_dir), CARD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---"):
        return None
    for line in text.split("---", 2)[1].splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def render_model_card(
    *, model_type: str, hidden_size: int, pooling: str, normalize: bool, append_eos: bool,
    max_length: int, query_instruction: str | None, run: Mapping[str, Any] | None = None,
) -> str:
    run = dict(run or {})
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "reasonembed-jax",
            model_type]
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity"]
    if run.get("base_model"):
        front.append(f"base_model: {_yaml_str(str(run['base_model']))}")
    front.append("tags:")
    front.extend(f"- {t}" for t in tags)
    if run.get("license"):
        front.append(f"license: {_yaml_str(str(run['license']))}")
    front.append("---")

    lines = [*front, "", "# Text embedding model trained with reasonembed-jax", ""]
    lines.append(f"A {model_type} encoder: {pooling.replace('_', '-')} pooling"
                 f"{', L2-normalised' if normalize else ''}, {hidden_size}-dimensional embeddings, "
                 f"up to {max_length} tokens"
                 f"{' (an EOS token is appended and pooled)' if append_eos else ''}.")
    if run.get("base_model"):
        lines.append(f"Fine-tuned from `{run['base_model']}`.")
    lines += ["", "## Query format", "",
              "Queries carry an instruction; documents are embedded as they are:", "", "```text",
              QUERY_TEMPLATE.format(instruction="{instruction}", query="{query}"), "```", ""]
    if query_instruction:
        lines += [f"Default instruction (the sentence-transformers `query` prompt): "
                  f"`{query_instruction}`", ""]

    if run:
        lines += ["## Training", ""]
        if "steps" in run:
            lines.append(f"- steps: {run['steps']}")
        if run.get("final_loss") is not None:
            lines.append(f"- final loss: {run['final_loss']:.6g} (step {run.get('final_loss_step')})")
        if run.get("data_sources"):
            lines.append("- data sources: " + ", ".join(f"`{s}`" for s in run["data_sources"]))
        if run.get("data"):
            lines += ["", "| domain | records | group size | batch per device |",
                      "|---|---|---|---|"]
            lines += [f"| {d['domain']} | {d['records']} | {d['group_size']} | {d['batch_size']} |"
                      for d in run["data"]]
        if run.get("eval"):
            lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in run["eval"].items()]
        if run.get("config"):
            lines += ["", "### Training configuration", "", "```json",
                      json.dumps(run["config"], indent=2, sort_keys=True, default=str), "```"]
        lines.append("")

    instruction = query_instruction or "Given a post, retrieve relevant passages."
    lines += [
        "## Usage", "", "sentence-transformers:", "", "```python",
        "from sentence_transformers import SentenceTransformer",
        'model = SentenceTransformer("PATH_TO_THIS_FOLDER")',
        ('q = model.encode(["why do moths circle lamps?"], prompt_name="query")'
         if query_instruction else
         f"q = model.encode([{_yaml_str(QUERY_TEMPLATE.format(instruction=instruction, query='why do moths circle lamps?'))}])"),  # noqa: E501
        'd = model.encode(["Moths navigate by keeping a distant light at a fixed angle ..."])',
        "scores = q @ d.T", "```", "", "reasonembed-jax:", "", "```python",
        "from reasonembed_jax.encode import TextEncoder",
        'enc = TextEncoder.from_pretrained("PATH_TO_THIS_FOLDER", dtype="bfloat16")',
        f'q = enc.encode(["why do moths circle lamps?"], instruction={_yaml_str(instruction)})',
        'd = enc.encode(["Moths navigate by keeping a distant light at a fixed angle ..."])',
        "scores = q @ d.T", "```", ""]
    return "\n".join(lines)


def write_model_card(out_dir: str | os.PathLike, **kwargs: Any) -> str:
    path = os.path.join(os.fspath(out_dir), CARD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_model_card(**kwargs))
    return path
