"""The shipped config files for tests, and small training configs derived from the demo's."""

from __future__ import annotations

import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Every config file (common.py is what they share, not a config): tests enumerate these.
CONFIG_NAMES = tuple(sorted(p.stem for p in CONFIGS.glob("*.py") if p.name != "common.py"))


def load_config_file(name: str, arg: str | None = None):
    from reasonembed_jax.training import config

    return config.load_config_file(f"{CONFIGS / name}.py" + (f":{arg}" if arg else ""))


def load_config_module(name: str):
    """``configs/{name}.py`` as a module (``common``: the recipe constants)."""
    from reasonembed_jax.training.config import load_module

    return load_module(CONFIGS / f"{name}.py")


def random_batch(b: int, g: int, t: int, seed: int) -> dict[str, np.ndarray]:
    """Left-padded random query / passage / reasoning rows (ids < 300, pad 0): ``b`` queries,
    ``b * g`` passages, width ``t``."""
    rng = np.random.default_rng(seed)

    def rows(n):
        ids = rng.integers(1, 300, (n, t)).astype(np.int32)
        lengths = rng.integers(3, t + 1, n)
        mask = (np.arange(t)[None] >= (t - lengths)[:, None]).astype(np.int32)
        return ids * mask, mask

    out = {}
    for role, n in (("query", b), ("passage", b * g), ("reasoning", b)):
        out[f"{role}_input_ids"], out[f"{role}_attention_mask"] = rows(n)
    return out


def tiny_train_config(*, steps: int = 5, devices: int = 8, domains: tuple[str, ...] = ("biology",),
                      arg: str | None = None):
    """Demo model on one or two demo domains, fixed lengths (one compiled shape per domain)."""
    c = load_config_file("demo", arg)
    sources = [s for s in c.data.sources]
    folder = pathlib.Path(sources[0]).parent
    c.data.sources = tuple(str(folder / f"{d}.jsonl.gz") for d in domains)
    c.data.num_devices = devices
    c.data.group_size = 4
    c.data.batch_size = 1
    c.data.domains = {}
    c.data.query_max_length = 32
    c.data.passage_max_length = 48
    c.data.reasoning_max_length = 32
    c.data.pad_to_max_length = True
    c.train.num_steps = steps
    c.train.checkpoint_every = 1000
    c.train.export_at_end = False
    c.train.progress_bar = False
    c.loss.ri_warmup_steps = 2
    c.optim.learning_rate = 1e-3
    return c


CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from train_configs import tiny_train_config

def get_config(arg=None):
    c = tiny_train_config(steps={steps}, devices={devices}, domains={domains!r})
    for key, value in {train!r}.items():
        c.train[key] = value
    c.train.export_at_end = True
    c.export.dtype = "float32"
    return c
"""


def write_config_file(path: pathlib.Path, *, steps: int, devices: int,
                      domains: tuple[str, ...] = ("biology", "economics"), **train) -> pathlib.Path:
    """A config file (for the CLI in a subprocess) holding ``tiny_train_config`` with ``train``
    overrides and an float32 export at the end."""
    path.write_text(CONFIG_FILE.format(tests=str(pathlib.Path(__file__).parent), steps=steps,
                                       devices=devices, domains=domains, train=train))
    return path
