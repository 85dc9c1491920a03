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


def _run(code: str, **env_changes) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RDR_JAX_REEXECUTED")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=300)
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


def test_xla_flags_merge_keeps_user_values():
    flag = "xla_cpu_experimental_ynn_fusion_type"
    assert runtime.merged_xla_flags("--xla_force_host_platform_device_count=8").split() == [
        "--xla_force_host_platform_device_count=8", f"--{flag}=-reduce"]
    mine = f"--{flag}=individual_dot --xla_cpu_use_onednn=false"
    assert runtime.merged_xla_flags(mine) == mine
    assert runtime.merged_xla_flags(runtime.merged_xla_flags("")) == f"--{flag}=-reduce"


# A matmul feeding a reduction (an LM head's log-softmax): does XLA fuse the reduction into the YNNPACK matmul?
REDUCE_FUSION = """
    import os, rdr_jax, jax, jax.numpy as jnp
    flags = os.environ.get("XLA_FLAGS", "-")
    x, e = jnp.ones((80, 512)), jnp.ones((4096, 512))
    hlo = jax.jit(lambda x, e: jnp.max(x @ e.T, axis=-1)).lower(x, e).compile().as_text()
    fused = any("__ynn_fusion" in line and "= f32[80]{0} fusion(" in line for line in hlo.splitlines())
    del os.environ["XLA_FLAGS"]
    print(flags, fused, rdr_jax.runtime.apply_xla_cpu_flags())  # JAX runs now: too late, so not set again
"""


def test_import_sets_the_xla_flag_that_keeps_reductions_out_of_matmuls(monkeypatch):
    """The reason for the flag: without it XLA fuses the reduction into the matmul kernel (4x slower there)."""
    low, high = runtime._XLA_CPU_FLAGS_JAXLIB
    if not low <= runtime._jaxlib_version() < high:
        pytest.skip(f"jaxlib {runtime._jaxlib_version()} is outside the versions the flag was checked with")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # `import rdr_jax` in this process has set it
    monkeypatch.delenv(runtime.OPT_OUT, raising=False)
    assert _run(REDUCE_FUSION).split() == ["--xla_cpu_experimental_ynn_fusion_type=-reduce", "False", "False"]
    # The control: XLA's default still makes the fusion the flag prevents.
    untuned = _run(REDUCE_FUSION.replace('del os.environ["XLA_FLAGS"]', "pass"), **{runtime.OPT_OUT: "0"})
    assert untuned.split() == ["-", "True", "False"]
