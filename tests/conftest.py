"""Test session set-up: 8 fake CPU devices, offline hub, absl flags parsed, shared data paths."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("REASONEMBED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()
# Config files read this to find the shared data wherever the tests run from.
os.environ["REASONEMBED_SHARED_DATA"] = str(SHARED_DATA)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(shared_data: pathlib.Path) -> pathlib.Path:
    return shared_data / "qwen3_tokenizer"


@pytest.fixture(scope="session")
def hf_configs_dir(shared_data: pathlib.Path) -> pathlib.Path:
    return shared_data / "hf_configs"


def _real_model_paths(name: str) -> tuple[pathlib.Path, pathlib.Path]:
    from reasonembed_jax.real_models import MODELS, models_dir

    model, root = MODELS[name], models_dir()
    gguf, hf = pathlib.Path(model.gguf_path(root)), pathlib.Path(model.hf_dir(root))
    if not gguf.is_file() or not (hf / "config.json").is_file():
        target = "models-smollm2" if name == "smollm2" else "models"
        pytest.skip(f"real model '{name}' not found under {root} (fetch and convert it with "
                    f"`make {target}`)")
    return gguf, hf


@pytest.fixture(scope="session")
def real_model_paths():
    """``real_model_paths(name)``: (GGUF file, converted HF folder) of a real model from
    ``reasonembed_jax.real_models`` (under $REASONEMBED_MODELS or .cache/models); skips the test
    with the reason when it is absent."""
    return _real_model_paths
