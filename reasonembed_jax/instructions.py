"""The task instructions: the one table that synthesis, training records and evaluation read.

A query is embedded as ``Instruct: {instruction}\\nQuery: {query}`` (``reasonembed_jax.text``);
the instruction names the task. The BRIGHT tasks use ReasonEmbed's short instructions
(``Given {a/an} {Domain} {item}, retrieve relevant {targets} that help answer the {item}.``),
the wording of BRIGHT's official instruction configs with the task's display name and a correct
article; other tasks have their own sentence. Standard library only: the synthesis environment
installs this package without its (JAX) dependencies and imports this module.
"""

from __future__ import annotations

BRIGHT_TASKS: tuple[str, ...] = (
    "biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow",
    "sustainable_living", "leetcode", "pony", "aops", "theoremqa_questions", "theoremqa_theorems",
)

# BRIGHT: (domain with its article, item, what is retrieved).
_BRIGHT_PARTS: dict[str, tuple[str, str, str]] = {
    "biology": ("a Biology", "post", "passages"),
    "earth_science": ("an Earth Science", "post", "passages"),
    "economics": ("an Economics", "post", "passages"),
    "psychology": ("a Psychology", "post", "passages"),
    "robotics": ("a Robotics", "post", "passages"),
    "stackoverflow": ("a Stack Overflow", "post", "passages"),
    "sustainable_living": ("a Sustainable Living", "post", "passages"),
    "leetcode": ("a Coding", "problem", "examples"),
    "pony": ("a Pony", "question", "passages"),
    "aops": ("a Math", "problem", "examples"),
    "theoremqa_questions": ("a Math", "problem", "examples"),
    "theoremqa_theorems": ("a Math", "problem", "theorems"),
}

# Tasks outside BRIGHT: the whole instruction (SciFact: the E5/MTEB wording).
_OTHER_INSTRUCTIONS: dict[str, str] = {
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim.",
}

TASKS: tuple[str, ...] = BRIGHT_TASKS + tuple(_OTHER_INSTRUCTIONS)


def canonical_task(task: str) -> str:
    """``earth-science`` / ``Earth_Science`` -> ``earth_science``; raises for an unknown task."""
    name = task.strip().lower().replace("-", "_")
    if name not in TASKS:
        raise ValueError(f"no instruction for task {task!r}; known: {', '.join(TASKS)}")
    return name


def task_instruction(task: str, long_documents: bool = False) -> str:
    """The query instruction of ``task``. With ``long_documents`` (BRIGHT's long-document
    setting) the tasks that retrieve "passages" retrieve "documents" instead."""
    name = canonical_task(task)
    if name in _OTHER_INSTRUCTIONS:
        if long_documents:
            raise ValueError(f"task {task!r} has no long-document setting")
        return _OTHER_INSTRUCTIONS[name]
    domain, item, target = _BRIGHT_PARTS[name]
    if long_documents and target == "passages":
        target = "documents"
    return f"Given {domain} {item}, retrieve relevant {target} that help answer the {item}."
