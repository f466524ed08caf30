"""Builds tests/data/eval_bright_mini: real BRIGHT examples + a small CONSTRUCTED corpus.

The real BRIGHT document corpora are not available offline. This fixture keeps the first 6
real examples of biology, earth-science and leetcode (from ../shared/data/bright, unchanged) and
builds a tiny `documents` corpus for them:
- biology / earth-science: each gold id gets a slice (paragraphs, round robin) of its query's
  real `gold_answer` text, cut to 1,200 characters;
- leetcode (gold_answer is N/A): gold ids get a placeholder sentence, and the first two
  `excluded_ids` of each query get that query's own text, a stand-in for the near-duplicate
  documents BRIGHT excludes, so the exclusion visibly changes the ranking.
Metric values on this corpus say nothing about BRIGHT; it only exercises the code paths.
Task file names deliberately mix spellings (examples: hyphens, documents: underscores).

Run from the repo root: python tests/data/eval_make_bright_mini.py
"""

import gzip
import json
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bright" / "examples"
OUT = pathlib.Path(__file__).resolve().parent / "eval_bright_mini"
TASKS = {"biology": "biology", "earth-science": "earth_science", "leetcode": "leetcode"}
PER_TASK = 6
MAX_CHARS = 1200


def main() -> None:
    (OUT / "examples").mkdir(parents=True, exist_ok=True)
    (OUT / "documents").mkdir(parents=True, exist_ok=True)
    for file_name, hub_name in TASKS.items():
        with gzip.open(SRC / f"{file_name}.jsonl.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][:PER_TASK]
        docs: dict[str, str] = {}
        for row in rows:
            gold = [g for g in row["gold_ids"] if g != "N/A"]
            if row["gold_answer"] != "N/A":
                paragraphs = [p.strip() for p in row["gold_answer"].split("\n\n") if p.strip()]
                for i, doc_id in enumerate(gold):
                    parts = paragraphs[i :: len(gold)] or paragraphs
                    docs.setdefault(doc_id, "\n\n".join(parts)[:MAX_CHARS])
            else:
                for doc_id in gold:
                    docs.setdefault(doc_id, f"Constructed placeholder for {doc_id}: its real "
                                            "content is not available offline.")
                for doc_id in [e for e in row["excluded_ids"] if e != "N/A"][:2]:
                    docs.setdefault(doc_id, row["query"][:MAX_CHARS])
        payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with gzip.GzipFile(OUT / "examples" / f"{file_name}.jsonl.gz", "wb", mtime=0) as f:
            f.write(payload.encode("utf-8"))  # mtime=0: rebuilding gives identical bytes
        with open(OUT / "documents" / f"{hub_name}.jsonl", "w", encoding="utf-8") as f:
            for doc_id, content in docs.items():
                f.write(json.dumps({"id": doc_id, "content": content}, ensure_ascii=False) + "\n")
        print(file_name, len(rows), "queries", len(docs), "documents")


if __name__ == "__main__":
    main()
