"""The OpenAI-compatible HTTP backend against a small local stub server: retries with backoff on
429/5xx, no retry on other 4xx, bounded concurrency, timeouts, embedding batches that fall back
to one request per text."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from remixer.backends import OpenAIHTTPBackend
from remixer.config import MODEL_DEFAULTS


class Stub:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.attempts: dict[str, int] = {}
        self.requests: list[dict] = []


def make_handler(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _reply(self, status: int, obj: dict) -> None:
            with stub.lock:  # done before the client can see the answer and send the next one
                stub.active -= 1
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stub.lock:
                stub.active += 1
                stub.max_active = max(stub.max_active, stub.active)
                stub.requests.append({"path": self.path, **body})
            if self.path == "/v1/chat/completions":
                self._chat(body)
            elif self.path == "/v1/embeddings":
                self._embed(body)
            else:
                self._reply(404, {"error": "no route"})

        def _chat(self, body: dict) -> None:
            prompt = body["messages"][0]["content"]
            with stub.lock:
                stub.attempts[prompt] = stub.attempts.get(prompt, 0) + 1
                n = stub.attempts[prompt]
            time.sleep(0.05)
            if prompt.startswith("flaky") and n <= 2:
                return self._reply(503 if n == 1 else 429, {"error": "busy"})
            if prompt.startswith("bad"):
                return self._reply(400, {"error": "prompt too long"})
            if prompt.startswith("slow"):
                time.sleep(1.5)
            finish = "length" if prompt.startswith("cut") else "stop"
            self._reply(200, {"choices": [{"message": {"content": f"echo {prompt}"},
                                           "finish_reason": finish}],
                              "usage": {"completion_tokens": len(prompt)}})

        def _embed(self, body: dict) -> None:
            texts = body["input"]
            if any(t.startswith("bad") for t in texts):
                return self._reply(400, {"error": "input too long"})
            data = [{"index": i, "embedding": [float(len(t)), 1.0, 0.0]}
                    for i, t in reversed(list(enumerate(texts)))]  # out of order on purpose
            self._reply(200, {"data": data})

    return Handler


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # the timeout test's client hangs up before the slow answer: expected


@pytest.fixture()
def server():
    stub = Stub()
    httpd = QuietServer(("127.0.0.1", 0), make_handler(stub))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


def backend(url: str, **over) -> OpenAIHTTPBackend:
    cfg = {**MODEL_DEFAULTS, "model": "m", "base_url": url, "max_concurrency": 3,
           "max_retries": 3, "backoff_s": 0.01, "timeout_s": 5.0, **over}
    return OpenAIHTTPBackend(cfg)


def test_generation_retries_and_reports_errors(server):
    stub, url = server
    sleeps: list[float] = []
    b = backend(url)
    b.sleep = sleeps.append
    prompts = ["flaky one", "good two", "bad three"] + [f"p{i}" for i in range(9)]
    out = b.generate(prompts, {"temperature": 0.5, "top_p": 0.9, "top_k": 40, "max_tokens": 7,
                               "regex": "<score>[1-5]</score>", "choice": None})
    assert out[0].text == "echo flaky one" and out[0].error is None
    assert stub.attempts["flaky one"] == 3  # 503, 429, then success
    assert out[1].text == "echo good two" and out[1].num_tokens == len("good two")
    assert out[2].text is None and "HTTP 400" in out[2].error
    assert stub.attempts["bad three"] == 1  # a 400 is not retried
    assert [o.text for o in out[3:]] == [f"echo p{i}" for i in range(9)]
    # exponential backoff: 0.01 * 2**k with jitter in [0.5, 1.5)
    assert len(sleeps) == 2 and 0.005 <= sleeps[0] < 0.015 and 0.01 <= sleeps[1] < 0.03
    assert stub.max_active <= 3  # bounded concurrency
    req = next(r for r in stub.requests if r["messages"][0]["content"] == "good two")
    assert (req["temperature"], req["top_p"], req["top_k"], req["max_tokens"]) == \
        (0.5, 0.9, 40, 7)
    assert req["model"] == "m"
    assert req["structured_outputs"] == {"regex": "<score>[1-5]</score>"}
    assert "chat_template_kwargs" not in req  # none asked for: none sent


def test_generation_sends_chat_template_kwargs_and_reports_cut_answers(server):
    stub, url = server
    b = backend(url, chat_template_kwargs={"enable_thinking": True, "x": 1})
    out = b.generate(["cut here", "fine"], {"max_tokens": 4,
                                            "chat_template_kwargs": {"enable_thinking": False}})
    assert [o.finish_reason for o in out] == ["length", "stop"]
    for req in stub.requests:  # the stage's switch over the model's, the rest kept
        assert req["chat_template_kwargs"] == {"enable_thinking": False, "x": 1}


def test_generation_timeout_is_counted_not_raised(server):
    stub, url = server
    b = backend(url, timeout_s=0.5, max_retries=1)
    b.sleep = lambda _s: None
    out = b.generate(["slow request", "fine"], {"max_tokens": 3})
    assert out[0].text is None and "timed out" in out[0].error.lower()
    assert stub.attempts["slow request"] == 2
    assert out[1].text == "echo fine"


def test_unreachable_server_is_counted_not_raised():
    b = backend("http://127.0.0.1:9", max_retries=1)  # nothing listens on the discard port
    b.sleep = lambda _s: None
    out = b.generate(["x"], {"max_tokens": 3})
    assert out[0].text is None and out[0].error


def test_embeddings_batches_order_and_fallback(server):
    stub, url = server
    b = backend(url, embed_batch_size=2)
    texts = ["a", "bbb", "cc", "bad text", "dddd"]
    emb, errors = b.embed(texts)
    assert errors[:3] == [None, None, None] and errors[4] is None
    assert "HTTP 400" in errors[3]
    raw = np.array([[len(t), 1.0, 0.0] for t in texts], np.float32)
    ref = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(emb[[0, 1, 2, 4]], ref[[0, 1, 2, 4]], rtol=1e-6)
    assert not emb[3].any()
    batches = sorted(tuple(r["input"]) for r in stub.requests if r["path"] == "/v1/embeddings")
    # two-text batches (sent concurrently, in any order); the rejected batch is re-sent one
    # text at a time so only "bad text" fails
    assert batches == sorted([("a", "bbb"), ("cc", "bad text"), ("dddd",), ("cc",),
                              ("bad text",)])
