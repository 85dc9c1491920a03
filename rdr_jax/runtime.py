"""Process settings that make JAX fast on a CPU host; the ``rdr-jax`` command and the benchmarks apply them.

Measured on the 2-core benchmark machine (``benchmarks/README.md`` has the numbers):

- **malloc** (glibc): XLA:CPU allocates each step's temporaries as one block (2.4 GB for the MiniLM DPR
  step) and frees it afterwards. glibc serves such blocks with ``mmap`` and gives them back with ``munmap``,
  so every step page-faults its whole working set again: 600k faults and ~1 s of kernel time per step, and
  5-7 s after anything else (PyTorch, a pause) has run. With one arena, no ``mmap`` for large blocks and no
  trimming, the freed block is reused: 0 faults per step. They are set when the process starts
  (``GLIBC_TUNABLES``), hence :func:`reexec_with_malloc_tuning`: the same settings through ``mallopt`` at run
  time (trim threshold -1) still page-faulted the first four MiniLM steps at 6.6 s each.
  The cost: memory freed by the process stays mapped to it (its RSS stays at its peak), as with the caching
  allocators that PyTorch and TensorFlow users put in with ``LD_PRELOAD``.

Skipped when ``RDR_JAX_HOST_TUNING=0``; tunables the user set already win.

Not for FAISS: building an index grows one large vector again and again; with these settings every freed
old copy stays in the heap instead of going back to the system. Measured (``benchmarks/corpus_search.py``, a
flat index of 200k x 768 float32): peak RSS 3.34x the vector bytes with them, 2.35x without (issue 16 saw
2.0x against 1.0x). ``rdr-jax index`` (:data:`UNTUNED_COMMANDS`) therefore runs with the malloc the user had,
and drops the settings when it inherited them from an ``rdr-jax`` parent.

Not set, though faster: ``XLA_FLAGS=--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot``
(matmuls through oneDNN, a few percent faster: benchmarks/README.md) kills the process with
SIGILL in PyTorch's own oneDNN kernels once both ran in one process (transformers' DeBERTa LayerNorm after a
JAX matmul), and conversion and the tests load PyTorch beside JAX.
"""

from __future__ import annotations

import os
import platform
import sys

OPT_OUT = "RDR_JAX_HOST_TUNING"
MALLOC_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                   "glibc.malloc.trim_threshold=68719476736")
_REEXEC_MARK = "RDR_JAX_REEXECUTED"
_USER_TUNABLES = "RDR_JAX_USER_GLIBC_TUNABLES"  # what GLIBC_TUNABLES was before the restart added ours
UNTUNED_COMMANDS = frozenset({"index"})  # FAISS index building: the settings double its peak memory


def enabled() -> bool:
    return os.environ.get(OPT_OUT, "1").strip().lower() not in ("0", "false", "no", "off")


def merged_glibc_tunables(existing: str, tunables=MALLOC_TUNABLES) -> str:
    named = {item.split("=", 1)[0] for item in existing.split(":") if item}
    return ":".join([item for item in existing.split(":") if item]
                    + [t for t in tunables if t.split("=", 1)[0] not in named])


def malloc_tuned() -> bool:
    current = os.environ.get("GLIBC_TUNABLES", "")
    return merged_glibc_tunables(current) == ":".join(i for i in current.split(":") if i)


def reexec_with_malloc_tuning() -> None:
    """Restart this very command (same PID, same arguments) with :data:`MALLOC_TUNABLES` in ``GLIBC_TUNABLES``,
    unless they are there already, the C library is not glibc, or the user opted out. Call it first thing in
    an entry point: the restart costs one interpreter start-up."""
    if (not enabled() or os.environ.get(_REEXEC_MARK) or platform.system() != "Linux"
            or platform.libc_ver()[0] != "glibc" or malloc_tuned()):
        return
    os.environ[_USER_TUNABLES] = os.environ.get("GLIBC_TUNABLES", "")
    os.environ["GLIBC_TUNABLES"] = merged_glibc_tunables(os.environ.get("GLIBC_TUNABLES", ""))
    os.environ[_REEXEC_MARK] = "1"  # never loop, whatever glibc made of the tunables
    _restart()


def _restart() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])


def reexec_without_malloc_tuning() -> None:
    """Restart this command with the ``GLIBC_TUNABLES`` the user had when the current ones are ours, inherited
    from an ``rdr-jax`` process that added them (a user's own setting is kept)."""
    user = os.environ.get(_USER_TUNABLES)
    if (user is None or os.environ.get(_REEXEC_MARK) != "1" or platform.system() != "Linux"
            or os.environ.get("GLIBC_TUNABLES", "") == user):
        return
    if user:
        os.environ["GLIBC_TUNABLES"] = user
    else:
        os.environ.pop("GLIBC_TUNABLES", None)
    os.environ[_REEXEC_MARK] = "untuned"  # never loop
    _restart()


def subcommand(argv: list[str]) -> str | None:
    """The ``rdr-jax`` subcommand in ``argv`` (arguments after the program): its first non-option word."""
    return next((a for a in argv if not a.startswith("-")), None)


def tune_host_process(argv: list[str] | None = None) -> None:
    """Everything above (today: the malloc restart), for every subcommand but :data:`UNTUNED_COMMANDS`; an
    entry point calls this before importing JAX."""
    if subcommand(sys.argv[1:] if argv is None else argv) in UNTUNED_COMMANDS:
        reexec_without_malloc_tuning()
        return
    reexec_with_malloc_tuning()


__all__ = ["MALLOC_TUNABLES", "OPT_OUT", "UNTUNED_COMMANDS", "merged_glibc_tunables", "reexec_with_malloc_tuning",
           "reexec_without_malloc_tuning", "subcommand", "tune_host_process", "enabled", "malloc_tuned"]
