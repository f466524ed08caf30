"""One interface to the LLMs and embedders the stages use.

- ``VLLMBackend``: vLLM's offline engine in this process. A stage hands it all prompts of a shard
  at once (``LLM.chat``/``LLM.generate``/``LLM.embed`` with a list), so vLLM schedules them as
  one continuous batch. Tensor/pipeline parallelism come from the model config.
- ``OpenAIHTTPBackend``: any OpenAI-compatible server (``vllm serve``): ``/v1/chat/completions``
  or ``/v1/completions`` and ``/v1/embeddings``, with bounded concurrency, per-request timeouts
  and retries with exponential backoff. Standard library only.
- ``ScriptedBackend``: deterministic answers from a Python function, for unit tests only.

A backend never raises for a single bad request: each result carries its own ``error``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass
class Generation:
    """One answer: ``text`` (None when the request failed), tokens generated, and the error."""

    text: str | None
    num_tokens: int = 0
    error: str | None = None
    finish_reason: str | None = None


class Backend(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], sampling: Mapping[str, Any]) -> list[Generation]:
        """One answer per prompt, in order. ``sampling``: temperature, top_p, top_k,
        max_tokens (and optionally seed)."""
        ...

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str | None]]:
        """``[N, D]`` float32 embeddings (rows L2-normalised) and one error (or None) per text;
        rows of failed texts are zero."""
        ...

    def close(self) -> None: ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """``x / ||x||`` per row (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norms > 0, x / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


# --------------------------------------------------------------------------- scripted (tests)


class ScriptedBackend:
    """Answers ``responder(prompt) -> str`` (an Exception instance means the request failed; a
    ``Generation`` is returned as is) and embeds with ``embedder(texts) -> [N, D]``. Records
    every batch it receives, with its sampling block."""

    name = "scripted"

    def __init__(self, responder: Callable[[str], str | Exception] | None = None,
                 embedder: Callable[[Sequence[str]], np.ndarray] | None = None) -> None:
        self.responder = responder
        self.embedder = embedder
        self.generate_batches: list[list[str]] = []
        self.generate_sampling: list[dict[str, Any]] = []
        self.embed_batches: list[list[str]] = []

    def generate(self, prompts: Sequence[str], sampling: Mapping[str, Any]) -> list[Generation]:
        if self.responder is None:
            raise RuntimeError("this scripted backend has no responder")
        self.generate_batches.append(list(prompts))
        self.generate_sampling.append(dict(sampling))
        out = []
        for prompt in prompts:
            answer = self.responder(prompt)
            if isinstance(answer, Generation):
                out.append(answer)
            elif isinstance(answer, Exception):
                out.append(Generation(None, 0, f"{type(answer).__name__}: {answer}"))
            else:
                out.append(Generation(answer, len(answer.split()), None, "stop"))
        return out

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str | None]]:
        if self.embedder is None:
            raise RuntimeError("this scripted backend has no embedder")
        self.embed_batches.append(list(texts))
        return l2_normalize(self.embedder(texts)), [None] * len(texts)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- vLLM offline


class VLLMBackend:
    """vLLM's offline ``LLM`` engine, created on first use from a model config entry.

    The engine must be created in a process whose entry point is guarded by
    ``if __name__ == "__main__":`` (vLLM starts worker processes).
    """

    name = "vllm"

    def __init__(self, model_cfg: Mapping[str, Any]) -> None:
        self.cfg = dict(model_cfg)
        self._llm = None

    def _engine(self):  # noqa: ANN202 (vllm type)
        if self._llm is not None:
            return self._llm
        from vllm import LLM

        cfg = self.cfg
        kwargs: dict[str, Any] = dict(
            model=cfg["model"],
            tokenizer=cfg["tokenizer"] or cfg["model"],
            tensor_parallel_size=cfg["tensor_parallel_size"],
            pipeline_parallel_size=cfg["pipeline_parallel_size"],
            gpu_memory_utilization=cfg["gpu_memory_utilization"],
            max_model_len=cfg["max_model_len"],
            enforce_eager=cfg["enforce_eager"],
            dtype=cfg["dtype"],
            seed=cfg["seed"],
            trust_remote_code=False,
        )
        if cfg["max_num_seqs"]:
            kwargs["max_num_seqs"] = cfg["max_num_seqs"]
        if cfg["runner"] == "pooling":
            kwargs["runner"] = "pooling"
            kwargs["pooler_config"] = _pooler_config(cfg["pooling_type"])
        kwargs.update(cfg["extra_engine_args"])
        self._llm = LLM(**kwargs)
        return self._llm

    def start(self) -> None:
        """Creates the engine now (otherwise it starts on first use)."""
        self._engine()

    def _prompt_lengths(self, prompts: Sequence[str], template_kwargs: Mapping[str, Any]
                        ) -> list[int]:
        tokenizer = self._engine().get_tokenizer()
        if self.cfg["use_chat"]:
            texts = [tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                **template_kwargs) for p in prompts]
        else:
            texts = list(prompts)
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def generate(self, prompts: Sequence[str], sampling: Mapping[str, Any]) -> list[Generation]:
        from vllm import SamplingParams

        llm = self._engine()
        kwargs = _vllm_sampling(sampling)
        if _structured(sampling):
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(**_structured(sampling))
        params = SamplingParams(**kwargs)
        results: list[Generation | None] = [None] * len(prompts)
        # A prompt longer than the context would make vLLM reject the whole batch: fail it alone.
        limit = self.cfg["max_model_len"] - 1
        send = []
        template_kwargs = chat_template_kwargs(self.cfg, sampling)
        for i, n in enumerate(self._prompt_lengths(prompts, template_kwargs)):
            if n > limit:
                results[i] = Generation(None, 0, f"prompt_too_long: {n} tokens > {limit}")
            else:
                send.append(i)

        def run(indices: list[int]) -> list[Any]:
            batch = [prompts[i] for i in indices]
            if self.cfg["use_chat"]:
                return llm.chat([[{"role": "user", "content": p}] for p in batch], params,
                                use_tqdm=False,
                                chat_template_kwargs=template_kwargs or None)
            return llm.generate(batch, params, use_tqdm=False)

        try:
            outputs = list(zip(send, run(send), strict=True)) if send else []
        except Exception:  # noqa: BLE001 - isolate the offending request(s) one by one
            outputs = []
            for i in send:
                try:
                    outputs.append((i, run([i])[0]))
                except Exception as err:  # noqa: BLE001
                    results[i] = Generation(None, 0, f"{type(err).__name__}: {err}")
        for i, out in outputs:
            completion = out.outputs[0]
            results[i] = Generation(completion.text, len(completion.token_ids), None,
                                    completion.finish_reason)
        return [r if r is not None else Generation(None, 0, "no output") for r in results]

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str | None]]:
        if not texts:
            return np.zeros((0, 0), np.float32), []
        llm = self._engine()
        tokenizer = llm.get_tokenizer()
        limit = self.cfg["max_model_len"]
        # Token ids are sent directly so an over-long text is truncated (keeping its start)
        # instead of failing the batch.
        ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        prompts = [{"prompt_token_ids": list(row[:limit]) or [tokenizer.eos_token_id]}
                   for row in ids]
        outs = llm.embed(prompts, use_tqdm=False)
        emb = np.stack([np.asarray(o.outputs.embedding, dtype=np.float32) for o in outs])
        return l2_normalize(emb), [None] * len(texts)

    def close(self) -> None:
        if self._llm is None:
            return
        engine = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(engine, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - best effort; the engine also stops at exit
                pass
        self._llm = None


def _pooler_config(pooling_type: str):  # noqa: ANN202 (vllm type)
    from vllm.config import PoolerConfig

    return PoolerConfig(pooling_type=pooling_type)


STRUCTURED_KEYS = ("regex", "choice", "json")


def _structured(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Constrained decoding asked for in a stage's sampling block (``regex``, ``choice`` or
    ``json``), e.g. ``{"regex": "[\\s\\S]{0,2000}<score>[1-5]</score>"}`` for the judge."""
    return {k: sampling[k] for k in STRUCTURED_KEYS if sampling.get(k) is not None}


def chat_template_kwargs(model_cfg: Mapping[str, Any], sampling: Mapping[str, Any]
                         ) -> dict[str, Any]:
    """The chat-template arguments of one request: the model's, then the stage's on top."""
    return {**(model_cfg.get("chat_template_kwargs") or {}),
            **(sampling.get("chat_template_kwargs") or {})}


def _vllm_sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(sampling) - {"temperature", "top_p", "top_k", "max_tokens", "seed",
                               "chat_template_kwargs", *STRUCTURED_KEYS}
    if unknown:
        raise ValueError(f"unknown sampling keys {sorted(unknown)}")
    out = {
        "temperature": float(sampling.get("temperature", 1.0)),
        "top_p": float(sampling.get("top_p", 1.0)),
        "max_tokens": int(sampling.get("max_tokens", 512)),
    }
    top_k = sampling.get("top_k", -1)
    if top_k is not None and int(top_k) > 0:
        out["top_k"] = int(top_k)
    if sampling.get("seed") is not None:
        out["seed"] = int(sampling["seed"])
    return out


# --------------------------------------------------------------------------- OpenAI HTTP


class HTTPStatusError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


_RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class OpenAIHTTPBackend:
    """An OpenAI-compatible server. Requests run on ``max_concurrency`` threads; each is retried
    up to ``max_retries`` times on connection errors, timeouts and 408/429/5xx answers, waiting
    ``backoff_s * 2**attempt`` (with jitter) between tries. Other 4xx answers are not retried."""

    name = "openai"

    def __init__(self, model_cfg: Mapping[str, Any],
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = dict(model_cfg)
        self.base_url = self.cfg["base_url"].rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.model = self.cfg["served_model_name"] or self.cfg["model"]
        key = os.environ.get(self.cfg["api_key_env"] or "", "")
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.sleep = sleep
        self._rng = random.Random(0)
        self.retries_used = 0

    def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        last: Exception | None = None
        for attempt in range(int(self.cfg["max_retries"]) + 1):
            if attempt:
                self.retries_used += 1
                delay = float(self.cfg["backoff_s"]) * 2 ** (attempt - 1)
                self.sleep(delay * (0.5 + self._rng.random()))
            request = urllib.request.Request(self.base_url + path, data=data,
                                             headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=float(self.cfg["timeout_s"])) as r:
                    return json.loads(r.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                body_text = err.read().decode("utf-8", "replace")
                last = HTTPStatusError(err.code, body_text)
                if err.code not in _RETRY_STATUSES:
                    raise last from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                last = err
            except json.JSONDecodeError as err:
                last = err
        assert last is not None
        raise last

    def _one_generation(self, prompt: str, sampling: Mapping[str, Any]) -> Generation:
        body: dict[str, Any] = {"model": self.model, **_vllm_sampling(sampling)}
        if _structured(sampling):
            body["structured_outputs"] = _structured(sampling)
        try:
            if self.cfg["use_chat"]:
                body["messages"] = [{"role": "user", "content": prompt}]
                template_kwargs = chat_template_kwargs(self.cfg, sampling)
                if template_kwargs:
                    body["chat_template_kwargs"] = template_kwargs
                reply = self._post("/v1/chat/completions", body)
                choice = reply["choices"][0]
                text = choice["message"].get("content") or ""
                reasoning = choice["message"].get("reasoning_content")
                if reasoning and not text:
                    text = f"<think>{reasoning}</think>"
            else:
                body["prompt"] = prompt
                reply = self._post("/v1/completions", body)
                choice = reply["choices"][0]
                text = choice.get("text") or ""
            tokens = int((reply.get("usage") or {}).get("completion_tokens") or 0)
            return Generation(text, tokens, None, choice.get("finish_reason"))
        except Exception as err:  # noqa: BLE001 - reported per request, never raised
            return Generation(None, 0, f"{type(err).__name__}: {err}")

    def generate(self, prompts: Sequence[str], sampling: Mapping[str, Any]) -> list[Generation]:
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=int(self.cfg["max_concurrency"])) as pool:
            return list(pool.map(lambda p: self._one_generation(p, sampling), prompts))

    def _embed_request(self, texts: Sequence[str]) -> list[list[float]]:
        body: dict[str, Any] = {"model": self.model, "input": list(texts)}
        if self.cfg["truncate_prompt_tokens"]:
            body["truncate_prompt_tokens"] = int(self.cfg["truncate_prompt_tokens"])
        reply = self._post("/v1/embeddings", body)
        data = sorted(reply["data"], key=lambda d: d["index"])
        if len(data) != len(texts):
            raise RuntimeError(f"server returned {len(data)} embeddings for {len(texts)} texts")
        return [d["embedding"] for d in data]

    def _embed_batch(self, texts: Sequence[str]) -> list[tuple[list[float] | None, str | None]]:
        """One request for the batch; if the server rejects it, one request per text, so a
        single bad text (e.g. over the context length) fails alone."""
        try:
            return [(v, None) for v in self._embed_request(texts)]
        except Exception as err:  # noqa: BLE001
            if len(texts) == 1:
                return [(None, f"{type(err).__name__}: {err}")]
        out: list[tuple[list[float] | None, str | None]] = []
        for text in texts:
            try:
                out.append((self._embed_request([text])[0], None))
            except Exception as err:  # noqa: BLE001
                out.append((None, f"{type(err).__name__}: {err}"))
        return out

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, list[str | None]]:
        size = int(self.cfg["embed_batch_size"])
        chunks = [list(texts[i: i + size]) for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(max_workers=int(self.cfg["max_concurrency"])) as pool:
            answers = list(pool.map(self._embed_batch, chunks))
        rows: list[np.ndarray | None] = []
        errors: list[str | None] = []
        for answer in answers:
            for vector, error in answer:
                rows.append(None if vector is None else np.asarray(vector, np.float32))
                errors.append(error)
        dim = next((r.shape[0] for r in rows if r is not None), 0)
        emb = np.zeros((len(texts), dim), dtype=np.float32)
        for i, r in enumerate(rows):
            if r is not None:
                emb[i] = r
        return l2_normalize(emb), errors

    def close(self) -> None:
        pass


def make_backend(model_cfg: Mapping[str, Any]) -> Backend:
    """The backend a model config entry asks for (``backend``: "vllm" or "openai")."""
    if model_cfg["backend"] == "vllm":
        return VLLMBackend(model_cfg)
    if model_cfg["backend"] == "openai":
        return OpenAIHTTPBackend(model_cfg)
    raise ValueError(f"unknown backend {model_cfg['backend']!r}")
