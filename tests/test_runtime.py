"""The host process set-up (rdr_jax/runtime.py): flag merging, the malloc restart, and what it is for."""

import os
import subprocess
import sys
import textwrap

import pytest

from rdr_jax import runtime


def test_glibc_tunables_merge_keeps_user_values():
    merged = runtime.merged_glibc_tunables("glibc.malloc.arena_max=4:glibc.cpu.x86_shstk=off")
    items = merged.split(":")
    assert items[:2] == ["glibc.malloc.arena_max=4", "glibc.cpu.x86_shstk=off"]
    assert "glibc.malloc.arena_max=1" not in items
    assert "glibc.malloc.mmap_max=0" in items and runtime.merged_glibc_tunables(merged) == merged


def _run(code: str, *args, **env_changes) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "RDR_JAX_REEXECUTED", "RDR_JAX_USER_GLIBC_TUNABLES")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


RESTART = """
    import os, sys
    print("start", os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
    from rdr_jax import runtime
    runtime.reexec_with_malloc_tuning()
    print("after", os.environ.get("GLIBC_TUNABLES", "-"), sys.argv[1:])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_restart_sets_the_tunables_once_and_keeps_the_command():
    lines = _run(RESTART).splitlines()
    assert lines[0] == "start -"  # the first process
    assert lines[1].startswith("start glibc.malloc.arena_max=1")  # the restarted one, same code
    assert lines[2].startswith("after glibc.malloc.arena_max=1") and len(lines) == 3


ENTRY = """
    import os, sys
    print("start", os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
    from rdr_jax import runtime
    runtime.tune_host_process()
    print("after", os.environ.get("GLIBC_TUNABLES", "-"))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_index_building_runs_without_the_malloc_settings():
    """FAISS index building peaks at twice the vector bytes under them (issue 16): `rdr-jax index` runs without."""
    assert runtime.subcommand(["--quiet", "index", "--kind", "flat"]) == "index"
    assert _run(ENTRY, "--debug", "index", "--out", "x").splitlines() == ["start -", "after -"]
    retrieve = _run(ENTRY, "retrieve", "--k", "5").splitlines()
    assert retrieve[1].startswith("start glibc.malloc.arena_max=1") and len(retrieve) == 3
    # inherited from an rdr-jax parent (e.g. a script it runs): dropped, the user's own tunables restored
    ours = runtime.merged_glibc_tunables("glibc.cpu.x86_shstk=off")
    inherited = {"GLIBC_TUNABLES": ours, "RDR_JAX_REEXECUTED": "1",
                 "RDR_JAX_USER_GLIBC_TUNABLES": "glibc.cpu.x86_shstk=off"}
    assert _run(ENTRY, "index", **inherited).splitlines() == [
        f"start {ours}", "start glibc.cpu.x86_shstk=off", "after glibc.cpu.x86_shstk=off"]
    # set by the user (no rdr-jax restart behind them): kept
    assert _run(ENTRY, "index", GLIBC_TUNABLES=ours).splitlines() == [f"start {ours}", f"after {ours}"]


def test_restart_can_be_turned_off():
    assert _run(RESTART, RDR_JAX_HOST_TUNING="0").splitlines() == ["start -", "after - []"]


# A jitted function whose temporaries are one large block, called a few times: page faults per call.
FAULTS = """
    import resource, jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))
    x = jnp.ones((4096, 64))
    f(x).block_until_ready(); f(x).block_until_ready()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x).block_until_ready()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_tuned_malloc_reuses_the_step_temporaries():
    """The reason for the restart: without it every call re-faults its 64 MiB temporary block."""
    untuned = int(_run(FAULTS, RDR_JAX_HOST_TUNING="0"))
    tuned = int(_run("from rdr_jax import runtime; runtime.reexec_with_malloc_tuning()\n" + textwrap.dedent(FAULTS)))
    assert untuned > 3 * 16384 * 0.9  # 3 calls x 64 MiB of 4 KiB pages
    assert tuned < untuned / 20
