"""Retrieval test collections: BEIR layout and BRIGHT (hub layout), loaded into ``RetrievalTask``.

BEIR layout (``beir:DIR``): ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
(``_id``, ``text``), ``qrels/<split>.tsv`` (``query-id  corpus-id  score``, header optional).
Document text is ``"{title} {text}"`` stripped.

BRIGHT (``bright:DIR[:task,...]``), a local copy of the hub dataset ``xlangai/BRIGHT``: one folder
per configuration (``examples``, ``documents``, ``long_documents``, or a reasoning-query
configuration such as ``gpt4_reason``), holding per-task files ``<task>-NNNNN-of-NNNNN.parquet``
(the hub's shards), ``<task>.parquet``, ``<task>.jsonl[.gz]`` or a folder ``<task>/`` of those.
Task names may use underscores (hub) or hyphens (anserini copies). Documents have ``id`` and
``content``; examples have ``id``, ``query``, ``reasoning``, ``gold_ids``, ``gold_ids_long``,
``excluded_ids`` (lists, or their Python-literal strings). ``gold_ids`` (or ``gold_ids_long`` with
long documents) become grade-1 qrels; ``excluded_ids`` other than ``"N/A"`` are removed from
that query's ranking before the top-k.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence

from reasonembed_jax.instructions import BRIGHT_TASKS, task_instruction

logger = logging.getLogger(__name__)

_NO_REASONING = {"", "empty", "n/a"}


def bright_instruction(task: str, long_documents: bool = False) -> str:
    """The task's short query instruction (ReasonEmbed's BRIGHT protocol), from the one table in
    ``reasonembed_jax.instructions``; with long documents "passages" become "documents"."""
    return task_instruction(canonical_bright_task(task), long_documents)


@dataclasses.dataclass
class RetrievalTask:
    """One evaluation collection. ``qrels[qid][doc_id] = grade``; ``excluded[qid]`` = document ids
    removed from that query's ranking. Only queries with qrels are kept."""

    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    instruction: str | None = None
    excluded: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.corpus_ids) != len(self.corpus_texts):
            raise ValueError(
                f"{self.name}: {len(self.corpus_ids)} ids, {len(self.corpus_texts)} texts"
            )
        if len(self.query_ids) != len(self.query_texts):
            raise ValueError(f"{self.name}: query ids and texts differ in length")
        for kind, ids in (("document", self.corpus_ids), ("query", self.query_ids)):
            if len(set(ids)) != len(ids):
                raise ValueError(f"{self.name}: duplicate {kind} ids")
        if not self.corpus_ids:
            raise ValueError(f"{self.name}: empty corpus")
        missing = [q for q in self.query_ids if q not in self.qrels]
        if missing:
            raise ValueError(
                f"{self.name}: {len(missing)} queries without qrels, e.g. {missing[:3]}"
            )
        known = set(self.query_ids)
        unknown = [q for q in self.qrels if q not in known]
        if unknown:
            raise ValueError(
                f"{self.name}: qrels for {len(unknown)} unknown queries, e.g. {unknown[:3]}"
            )

    def excluded_indices(self) -> list[list[int]] | None:
        """Per query (in ``query_ids`` order) the corpus rows to exclude; ``None`` if none.

        Excluded ids absent from the corpus cannot be retrieved anyway and are skipped."""
        if not any(self.excluded.values()):
            return None
        row = {doc_id: i for i, doc_id in enumerate(self.corpus_ids)}
        return [[row[d] for d in self.excluded.get(q, ()) if d in row] for q in self.query_ids]


# ----------------------------------------------------------------------------- file helpers


def _open_text(path: pathlib.Path):  # noqa: ANN202
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(
        path, encoding="utf-8"
    )


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a ``.jsonl`` or ``.jsonl.gz`` file; a bad line raises with its line number."""
    path = pathlib.Path(path)
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e})") from e


def read_parquet(path: str | os.PathLike) -> list[dict]:
    """Rows of a parquet file as dicts (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise ImportError("reading parquet needs pyarrow (pip install pyarrow)") from e
    return pq.read_table(path).to_pylist()


def _read_rows(paths: Sequence[pathlib.Path]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        rows.extend(read_parquet(path) if path.suffix == ".parquet" else read_jsonl(path))
    return rows


def _field(row: Mapping, name: str, where: str) -> object:
    if name not in row:
        raise ValueError(f"{where}: missing field {name!r} (has {sorted(row)})")
    return row[name]


# ----------------------------------------------------------------------------- BEIR


def read_qrels_tsv(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """BEIR qrels ``query-id<TAB>corpus-id<TAB>score`` (a header line is skipped); also accepts
    TREC qrels ``qid 0 docid grade`` (whitespace separated, 4 columns)."""
    path = pathlib.Path(path)
    qrels: dict[str, dict[str, int]] = {}
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t") if "\t" in line else line.split()
            if not line.strip():
                continue
            if len(parts) == 4:
                qid, _, doc_id, grade = parts
            elif len(parts) == 3:
                qid, doc_id, grade = parts
            else:
                raise ValueError(f"{path}:{n}: expected 3 or 4 columns, got {len(parts)}")
            try:
                value = int(grade)
            except ValueError:
                if n == 1:
                    continue  # header
                raise ValueError(f"{path}:{n}: grade {grade!r} is not an integer") from None
            qrels.setdefault(qid, {})[doc_id] = value
    if not qrels:
        raise ValueError(f"{path}: no qrels")
    return qrels


def load_beir(
    root: str | os.PathLike,
    split: str = "test",
    *,
    qrels_file: str | os.PathLike | None = None,
    instruction: str | None = None,
    name: str | None = None,
) -> RetrievalTask:
    """A BEIR-layout folder as one task (queries restricted to those with qrels)."""
    root = pathlib.Path(root)
    corpus_path = _first_existing(root, ("corpus.jsonl", "corpus.jsonl.gz"))
    queries_path = _first_existing(root, ("queries.jsonl", "queries.jsonl.gz"))
    qrels_path = pathlib.Path(qrels_file) if qrels_file else root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise FileNotFoundError(f"qrels file {qrels_path} not found (use --split or --qrels)")
    qrels = read_qrels_tsv(qrels_path)
    corpus_ids, corpus_texts = [], []
    for row in read_jsonl(corpus_path):
        doc_id = str(_field(row, "_id", str(corpus_path)))
        corpus_ids.append(doc_id)
        corpus_texts.append(f"{row.get('title') or ''} {_field(row, 'text', doc_id)}".strip())
    query_text = {
        str(_field(r, "_id", str(queries_path))): str(_field(r, "text", str(queries_path)))
        for r in read_jsonl(queries_path)
    }
    missing = [q for q in qrels if q not in query_text]
    if missing:
        raise ValueError(
            f"{qrels_path}: {len(missing)} query ids not in {queries_path}: {missing[:3]}"
        )
    known = set(corpus_ids)
    unjudgeable = sum(1 for rel in qrels.values() for d in rel if d not in known)
    if unjudgeable:
        logger.warning("%s: %d qrels documents are not in the corpus (still count as relevant)",
                       qrels_path, unjudgeable)
    query_ids = [q for q in query_text if q in qrels]
    logger.info("%s: %d of %d queries have qrels in %s", root, len(query_ids), len(query_text),
                qrels_path.name)
    return RetrievalTask(
        name=name or root.name,
        corpus_ids=corpus_ids,
        corpus_texts=corpus_texts,
        query_ids=query_ids,
        query_texts=[query_text[q] for q in query_ids],
        qrels=qrels,
        instruction=instruction,
    )


def _first_existing(root: pathlib.Path, names: Sequence[str]) -> pathlib.Path:
    for name in names:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"none of {list(names)} in {root}")


# ----------------------------------------------------------------------------- BRIGHT


def canonical_bright_task(task: str) -> str:
    """``earth-science`` -> ``earth_science``; raises for names outside the 12 BRIGHT tasks."""
    name = task.strip().replace("-", "_")
    if name not in BRIGHT_TASKS:
        raise ValueError(f"unknown BRIGHT task {task!r}; known: {', '.join(BRIGHT_TASKS)}")
    return name


def find_bright_files(root: str | os.PathLike, config: str, task: str) -> list[pathlib.Path]:
    """Files of one configuration (``examples``, ``documents``, ...) and task, in shard order."""
    folder = pathlib.Path(root) / config
    canonical = canonical_bright_task(task)
    tried = []
    for spelling in dict.fromkeys((canonical, canonical.replace("_", "-"))):
        for pattern in (f"{spelling}-*-of-*.parquet", f"{spelling}.parquet", f"{spelling}.jsonl",
                        f"{spelling}.jsonl.gz"):
            tried.append(str(folder / pattern))
            found = sorted(folder.glob(pattern))
            if found:
                return found
        sub = folder / spelling
        tried.append(f"{sub}/*.parquet|*.jsonl|*.jsonl.gz")
        if sub.is_dir():
            found = sorted(p for p in sub.iterdir()
                           if p.name.endswith((".parquet", ".jsonl", ".jsonl.gz")))
            if found:
                return found
    raise FileNotFoundError(f"no BRIGHT {config!r} files for task {task!r}; looked for: "
                            + ", ".join(tried))


def available_bright_tasks(root: str | os.PathLike, config: str = "examples") -> list[str]:
    """BRIGHT tasks (canonical names, benchmark order) that have ``config`` files under ``root``."""
    out = []
    for task in BRIGHT_TASKS:
        try:
            find_bright_files(root, config, task)
        except FileNotFoundError:
            continue
        out.append(task)
    return out


def _id_list(value: object, where: str) -> list[str]:
    """A list field that may be a list/array or its Python-literal string (``"['a', 'b']"``)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"{where}: cannot parse id list {value[:80]!r}") from e
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of strings, got {type(value).__name__}")
    return [v for v in value if v != "N/A"]


def load_bright_instructions(config_dir: str | os.PathLike, task: str,
                             long_documents: bool = False) -> str:
    """Reads an official BRIGHT instruction config (``<dir>/<task>.json``), whose query prefix
    has the form ``"Instruct: ...\\nQuery: "`` with ``{task}`` for the task name, and returns the
    instruction between the markers (``format_query`` adds the markers back)."""
    canonical = canonical_bright_task(task)
    path = pathlib.Path(config_dir) / f"{canonical}.json"
    if not path.is_file():
        raise FileNotFoundError(f"instruction config {path} not found")
    config = json.loads(path.read_text())
    section = config.get("instructions_long" if long_documents else "instructions") or {}
    prefix = section.get("query")
    if prefix is None:
        raise ValueError(f"{path}: no query instruction")
    prefix = prefix.format(task=canonical)
    head, tail = "Instruct: ", "\nQuery: "
    if not (prefix.startswith(head) and prefix.endswith(tail)):
        raise ValueError(f"{path}: query instruction {prefix!r} is not of the form "
                         f"'Instruct: ...\\nQuery: ' used by format_query")
    return prefix[len(head) : -len(tail)]


def load_bright_task(
    root: str | os.PathLike,
    task: str,
    *,
    examples: str = "examples",
    query_field: str = "query",
    long_documents: bool = False,
    instructions: str | None = "short",
) -> RetrievalTask:
    """One BRIGHT task.

    Args:
      examples: configuration folder holding the queries (``examples`` or e.g. ``gpt4_reason``).
      query_field: ``query`` (original) or ``reasoning`` (the examples' reasoning text).
      long_documents: use ``long_documents`` and ``gold_ids_long`` instead of the short corpus.
      instructions: ``"short"`` (built-in per-task instruction), ``None``/``"none"``, or a folder
        of official BRIGHT instruction configs (e.g. ``bright/instruction_configs/qwen``).
    """
    canonical = canonical_bright_task(task)
    if query_field not in ("query", "reasoning"):
        raise ValueError(f"query_field must be 'query' or 'reasoning', got {query_field!r}")
    corpus_config = "long_documents" if long_documents else "documents"
    gold_field = "gold_ids_long" if long_documents else "gold_ids"
    example_files = find_bright_files(root, examples, canonical)
    document_files = find_bright_files(root, corpus_config, canonical)

    corpus_ids, corpus_texts = [], []
    for row in _read_rows(document_files):
        corpus_ids.append(str(_field(row, "id", f"{canonical} {corpus_config}")))
        corpus_texts.append(str(_field(row, "content", corpus_ids[-1])))

    query_ids, query_texts, qrels, excluded = [], [], {}, {}
    no_reasoning = []
    for row in _read_rows(example_files):
        qid = str(_field(row, "id", f"{canonical} {examples}"))
        where = f"{canonical} query {qid}"
        text = str(_field(row, query_field, where))
        if query_field == "reasoning" and text.strip().lower() in _NO_REASONING:
            no_reasoning.append(qid)
        gold = _id_list(_field(row, gold_field, where), where)
        if not gold:
            raise ValueError(f"{where}: no {gold_field} (task {canonical} has no "
                             f"{'long-document ' if long_documents else ''}gold documents)")
        query_ids.append(qid)
        query_texts.append(text)
        qrels[qid] = {doc_id: 1 for doc_id in gold}
        excluded[qid] = _id_list(row.get("excluded_ids", []), where)
        overlap = set(excluded[qid]) & set(gold)
        if overlap:
            raise ValueError(f"{where}: ids both gold and excluded: {sorted(overlap)[:3]}")
    if no_reasoning:
        raise ValueError(f"{canonical}: {len(no_reasoning)} queries have no reasoning text "
                         f"(e.g. id {no_reasoning[0]}); use --query-field query for this task")

    if instructions is None or instructions == "none":
        instruction = None
    elif instructions == "short":
        instruction = bright_instruction(canonical, long_documents)
    else:
        instruction = load_bright_instructions(instructions, canonical, long_documents)
    return RetrievalTask(
        name=canonical, corpus_ids=corpus_ids, corpus_texts=corpus_texts, query_ids=query_ids,
        query_texts=query_texts, qrels=qrels, instruction=instruction, excluded=excluded,
    )


def load_bright(
    root: str | os.PathLike, tasks: Sequence[str] | None = None, **kwargs: object
) -> list[RetrievalTask]:
    """Several BRIGHT tasks (all 12 when ``tasks`` is None); keyword arguments as
    ``load_bright_task``."""
    names = [canonical_bright_task(t) for t in tasks] if tasks else list(BRIGHT_TASKS)
    return [load_bright_task(root, t, **kwargs) for t in names]


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: ``beir:DIR``, ``bright:DIR`` or ``bright:DIR:task1,task2``."""

    kind: str
    path: str
    tasks: tuple[str, ...] | None = None


def parse_data_spec(spec: str) -> DataSpec:
    """Parses a ``--data`` string; the task list is recognised only if every name is a BRIGHT task
    (so paths containing ``:`` still work)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("beir", "bright") or not rest:
        raise ValueError(f"bad data spec {spec!r}; expected beir:DIR, bright:DIR or "
                         f"bright:DIR:task,...")
    if kind == "bright" and ":" in rest:
        path, _, tail = rest.rpartition(":")
        names = [t for t in tail.split(",") if t]
        try:
            tasks = tuple(canonical_bright_task(t) for t in names)
        except ValueError:
            if os.path.exists(rest):
                return DataSpec(kind, rest)
            raise
        return DataSpec(kind, path, tasks or None)
    return DataSpec(kind, rest)


def load_data(
    spec: str | DataSpec,
    *,
    split: str | None = None,
    qrels_file: str | os.PathLike | None = None,
    query_field: str = "query",
    long_documents: bool = False,
    instructions: str | None = "short",
    instruction: str | None = None,
) -> list[RetrievalTask]:
    """Loads the tasks of one data spec.

    ``split``: the BEIR qrels split (default ``test``) or the BRIGHT examples configuration
    (default ``examples``). ``instruction`` overrides every task's query instruction.
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if not os.path.isdir(spec.path):
        raise FileNotFoundError(f"data folder {spec.path} not found")
    if spec.kind == "beir":
        if query_field != "query":
            raise ValueError("--query-field reasoning applies to BRIGHT data only")
        tasks = [load_beir(spec.path, split or "test", qrels_file=qrels_file,
                           instruction=instruction)]
    else:
        if qrels_file is not None:
            raise ValueError("--qrels applies to BEIR data only (BRIGHT qrels are its gold_ids)")
        names = spec.tasks
        if names is None:  # all 12 tasks; name every missing one rather than skipping it
            names = BRIGHT_TASKS
            have = available_bright_tasks(spec.path, split or "examples")
            missing = [t for t in names if t not in have]
            if missing:
                raise FileNotFoundError(
                    f"BRIGHT {split or 'examples'!r} files missing under {spec.path} for tasks "
                    f"{missing}; name the tasks to evaluate as bright:DIR:task1,task2")
        tasks = load_bright(spec.path, names, examples=split or "examples",
                            query_field=query_field, long_documents=long_documents,
                            instructions=instructions)
        if instruction is not None:
            for task in tasks:
                task.instruction = instruction
    return tasks
