"""rdr_jax.models.config: the one ComputeSettings of every family, and the dtype names."""

import jax.numpy as jnp
import pytest

from rdr_jax.models import bert, dpr, deberta_v2, t5, bart
from rdr_jax.models.config import DTYPES, ComputeSettings, dtype_from_name


def test_dtype_from_name():
    assert dtype_from_name("bfloat16", "model.dtype") is jnp.bfloat16
    assert set(DTYPES) == {"float32", "bfloat16", "float16"}
    with pytest.raises(ValueError, match=r"--dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'fp8'"):
        dtype_from_name("fp8", "--dtype")


def test_one_runtime_for_every_family():
    assert bert.ComputeSettings is dpr.ComputeSettings is deberta_v2.ComputeSettings is t5.ComputeSettings is bart.ComputeSettings is ComputeSettings
    rt = ComputeSettings(jnp.bfloat16, jnp.float32, True)
    assert (rt.dtype, rt.param_dtype, rt.remat, rt.relative_attention_impl) == (jnp.bfloat16, jnp.float32, True,
                                                                                "skew")
    with pytest.raises(ValueError, match="relative_attention_impl must be one of"):
        ComputeSettings(relative_attention_impl="fast")
