"""The whole pipeline on the real vLLM engine (CPU build) with a tiny random-weight Qwen3:
once with the offline engine, once against two local `vllm serve` processes (generation and
pooling). The generated text is noise, so this checks plumbing, counting and failure handling:
every stage runs, every count adds up, a prompt longer than the context fails alone and is
counted, leaked gold ids never become sources, and the final file passes the trainer's schema
(or is empty with the reasons counted upstream)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from reasonembed_jax.records import parse_record_line

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed"),
]

MAX_MODEL_LEN = 2048
SYNTHESIS_DIR = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, shared_data) -> pathlib.Path:
    from tiny_model import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"),
                            shared_data / "qwen3_tokenizer")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data) -> tuple[pathlib.Path, pathlib.Path, list[str]]:
    """10 SciFact abstracts, one dense 4,900-character document (far more tokens than the
    context, so every prompt holding it must fail and be counted), and a gold-id list naming
    two of the abstracts."""
    folder = tmp_path_factory.mktemp("data")
    docs = []
    with open(shared_data / "beir_scifact" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if 400 <= len(doc["title"]) + len(doc["text"]) <= 2500:
                docs.append(doc)
            if len(docs) == 10:
                break
    dense = " ".join(f"{i % 997:03d}" for i in range(1225))[:4900]
    docs.append({"_id": "dense-long", "title": "", "text": dense})
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    gold = [docs[0]["_id"], docs[1]["_id"]]
    gold_path = folder / "gold_ids.txt"
    gold_path.write_text("\n".join(gold) + "\n")
    return path, gold_path, gold


def _config(tmp_path: pathlib.Path, model: pathlib.Path, corpus_path: pathlib.Path,
            gold_path: pathlib.Path, backend: str, ports: tuple[int, int] = (0, 0)
            ) -> pathlib.Path:
    engine = {"model": str(model), "max_model_len": MAX_MODEL_LEN, "gpu_memory_utilization": 0.3,
              "enforce_eager": True, "dtype": "float32", "max_num_seqs": 64,
              "chat_template_kwargs": {"enable_thinking": False}}
    if backend == "vllm":
        writer = {"backend": "vllm", **engine}
        embedder = {"backend": "vllm", "runner": "pooling", **engine}
    else:
        writer = {"backend": "openai", "model": "tiny-writer", "base_url":
                  f"http://127.0.0.1:{ports[0]}/v1", "max_concurrency": 8, "timeout_s": 120,
                  "max_retries": 2, "backoff_s": 0.2,
                  "chat_template_kwargs": {"enable_thinking": False}}
        embedder = {"backend": "openai", "runner": "pooling", "model": "tiny-embedder",
                    "base_url": f"http://127.0.0.1:{ports[1]}", "embed_batch_size": 4,
                    "max_concurrency": 2, "timeout_s": 120, "max_retries": 2, "backoff_s": 0.2}
    sampling = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 32}
    cfg = {
        "seed": 0, "shard_size": 4, "keep_engines": True,
        "data": {"corpus": str(corpus_path), "exclude_ids": [str(gold_path)]},
        "models": {"writer": writer, "judge": writer, "embedder": embedder},
        "sources": {"min_chars": 200, "max_chars": 5000, "sample_size": 100},
        "queries": {"sampling": sampling, "max_attempts": 2, "min_chars": 5},
        "mining": {"top_k": 4},
        # constrained decoding (vLLM structured outputs) makes even the noise model end with a
        # score tag, so records reach the split, reasoning and schema validation
        "annotation": {"sampling": {**sampling, "top_k": 40, "max_tokens": 48,
                                    "regex": "[a-z ]{0,12}<score>[1-5]</score>"},
                       "max_attempts": 2},
        "reasoning": {"sampling": sampling, "max_attempts": 2},
    }
    path = tmp_path / f"config_{backend}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def _env(tmp_path: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               VLLM_CACHE_ROOT=str(tmp_path / "vllm_cache"), VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    return env


def _run_pipeline(tmp_path: pathlib.Path, config: pathlib.Path, work: pathlib.Path,
                  timeout: int) -> dict:
    log = tmp_path / f"{work.name}.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "remixer", "pipeline", "--config", str(config),
             "--work-dir", str(work), "--domain", "scifact"],
            stdout=out, stderr=subprocess.STDOUT, env=_env(tmp_path), timeout=timeout,
            cwd=SYNTHESIS_DIR)
    if proc.returncode != 0:
        pytest.fail(f"pipeline exited {proc.returncode}:\n{log.read_text()[-6000:]}")
    return json.loads((work / "pipeline_summary.json").read_text())


def _check_run(work: pathlib.Path, summaries: dict, gold: list[str], *, http: bool) -> None:
    sources = summaries["sources"]
    assert sources["excluded_gold_id"] == 2
    assert sources["selected"] == 9 and "too_long" not in sources
    chosen = [json.loads(line)["id"] for line in (work / "sources" / "final.jsonl").open()]
    assert "dense-long" in chosen and not set(gold) & set(chosen)

    q = summaries["queries"]
    assert q["items_in"] == 9
    # the dense document's prompt exceeds the context on every attempt: failed, counted, dropped
    assert q["llm_request_errors"] >= 2 and q["dropped_no_valid_query"] >= 1
    assert q["items_out"] + q["dropped_no_valid_query"] == q["items_in"]
    assert q["records_final"] + q.get("dropped_duplicate_query", 0) == q["items_out"]
    assert q["tokens_generated"] > 0 and q["tokens_per_s"] > 0

    c = summaries["candidates"]
    assert c["items_in"] == q["records_final"]
    mined = [json.loads(line) for line in (work / "candidates" / "final.jsonl").open()]
    for rec in mined:
        ids = [x["doc_id"] for x in rec["candidates"]]
        assert rec["source_id"] not in ids and len(ids) == len(set(ids))
        assert len(ids) == 4 or (http and c["corpus_unusable"])
    if http:  # the dense document is over the embedder's context: it fails alone, counted
        assert c["corpus_unusable"] == 1
    else:  # the offline backend truncates it
        assert c["corpus_unusable"] == 0

    a = summaries["annotations"]
    labels = sum(v for k, v in a.items() if k.startswith("label_"))
    assert labels == a["pairs"] == c["candidates"]
    assert a["parse_failure_rate"] >= 0 and a["llm_requests"] >= a["pairs"]

    s = summaries["split"]
    dropped = sum(v for k, v in s.items() if k.startswith("dropped"))
    assert s["items_out"] + dropped == s["items_in"] == a["records_final"]

    r = summaries["reasoning"]
    lines = (work / "reasoning" / "final.jsonl").read_text().splitlines()
    assert r["records_final"] == len(lines) <= s["items_out"]
    for number, line in enumerate(lines, 1):
        parse_record_line(line, source="final", line_number=number)
    for stage in summaries:
        assert (work / stage / "summary.json").exists()


def test_pipeline_offline_engine(tmp_path, tiny_model, corpus):
    corpus_path, gold_path, gold = corpus
    config = _config(tmp_path, tiny_model, corpus_path, gold_path, "vllm")
    start = time.perf_counter()
    summaries = _run_pipeline(tmp_path, config, tmp_path / "work_offline", timeout=900)
    print(f"offline pipeline: {time.perf_counter() - start:.1f}s")
    _check_run(tmp_path / "work_offline", summaries, gold, http=False)
    # a second run finds everything done and changes nothing
    before = (tmp_path / "work_offline" / "reasoning" / "final.jsonl").read_bytes()
    _run_pipeline(tmp_path, config, tmp_path / "work_offline", timeout=300)
    assert (tmp_path / "work_offline" / "reasoning" / "final.jsonl").read_bytes() == before
    log = (tmp_path / "work_offline.log").read_text()
    assert "already done, skipped" in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, proc: subprocess.Popen, deadline: float, log: pathlib.Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(2)
    pytest.fail(f"vllm serve on port {port} not healthy in time:\n{log.read_text()[-4000:]}")


def test_pipeline_against_vllm_serve(tmp_path, tiny_model, corpus):
    corpus_path, gold_path, gold = corpus
    ports = (_free_port(), _free_port())
    serve = [sys.executable, str(pathlib.Path(__file__).with_name("vllm_serve.py"))]
    common = [str(tiny_model), "--host", "127.0.0.1", "--max-model-len", str(MAX_MODEL_LEN),
              "--enforce-eager", "--dtype", "float32", "--gpu-memory-utilization", "0.3",
              "--max-num-seqs", "64"]
    commands = [
        [*serve, "serve", *common, "--port", str(ports[0]),
         "--served-model-name", "tiny-writer"],
        [*serve, "serve", *common, "--port", str(ports[1]),
         "--served-model-name", "tiny-embedder", "--runner", "pooling",
         "--pooler-config", json.dumps({"pooling_type": "LAST"})],
    ]
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / "serve_writer.log", tmp_path / "serve_embedder.log"]
    try:
        for cmd, log in zip(commands, logs, strict=True):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                              env=_env(tmp_path), start_new_session=True))
        deadline = time.monotonic() + 420
        for port, proc, log in zip(ports, procs, logs, strict=True):
            _wait_healthy(port, proc, deadline, log)
        config = _config(tmp_path, tiny_model, corpus_path, gold_path, "openai", ports)
        start = time.perf_counter()
        summaries = _run_pipeline(tmp_path, config, tmp_path / "work_http", timeout=600)
        print(f"http pipeline: {time.perf_counter() - start:.1f}s")
        _check_run(tmp_path / "work_http", summaries, gold, http=True)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
