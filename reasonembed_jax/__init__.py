"""reasonembed-jax: text embedders (decoder LLMs and BERT) for reasoning-intensive retrieval in
JAX.

The package root imports nothing heavy, so light modules (``reasonembed_jax.records``) can be used
by the synthesis stage without JAX installed.

Importing it sets two run-time defaults through the environment, before JAX starts (issue 16;
``README.md``, "Speed against PyTorch on a quiet CPU"); ``REASONEMBED_RUNTIME_DEFAULTS=0`` turns
both off and a value the user set already is kept:

- ``XLA_FLAGS`` gains ``--xla_cpu_experimental_ynn_fusion_type=``: XLA:CPU then runs its dots
  with Eigen instead of YNNPACK fusions, which on a 2-core AVX2 machine ran MiniLM's forward 1.5x
  faster (YNNPACK fused the softmax into the attention's value product, at ~4 ns per score) and
  is about 2x more accurate in fp32 (``benchmarks/cpu_dot_accuracy.py``). It only changes CPU
  compilation; GPU and TPU programs are untouched. The flag is experimental and XLA aborts at
  start on a flag it does not know, so it is added only for the jaxlib versions it was checked
  on (``YNN_FLAG_JAXLIB``); on others XLA's default stays.
- JAX's persistent compilation cache is on, in ``$XDG_CACHE_HOME/reasonembed_jax/xla`` (else
  ``~/.cache/...``), for programs that took at least 0.2 s to compile, so a second run of the
  same step or encoder shape loads it instead of compiling. No size cap is set: JAX's eviction
  scan races with other processes writing the same folder (entries then fail to write); the
  folder can be deleted at any time.
"""

import os
import sys

__version__ = "0.1.0"

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
YNN_FLAG_JAXLIB = ("0.10.", "0.11.")  # jaxlib releases known to accept YNN_FLAG
RUNTIME_DEFAULTS_ENV = "REASONEMBED_RUNTIME_DEFAULTS"


def default_compilation_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "reasonembed_jax", "xla")


def _jaxlib_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:  # the synthesis environment has no JAX
        return ""


def _apply_runtime_defaults() -> None:
    if os.environ.get(RUNTIME_DEFAULTS_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    added_flag = YNN_FLAG.rstrip("=") not in flags and _jaxlib_version().startswith(YNN_FLAG_JAXLIB)
    if added_flag:
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()
    cache_dir = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", default_compilation_cache_dir())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    jax = sys.modules.get("jax")
    if jax is None:
        return  # JAX reads all of these when it is imported
    # JAX came first: its config read the environment already.
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    from jax._src import xla_bridge

    if added_flag and xla_bridge.backends_are_initialized():
        import logging

        logging.getLogger(__name__).info(
            "JAX's backends started before reasonembed_jax was imported, so XLA_FLAGS=%s does not "
            "apply to this process (import reasonembed_jax first, or set it yourself)", YNN_FLAG)


_apply_runtime_defaults()
