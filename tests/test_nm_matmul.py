"""The packed N:M format and the Pallas 2:4 matmul: round trips, the byte budget, the
worked example of the docstring, the kernel (interpret mode) and its gradients against
the pure-JAX reference, readable errors, and GPU/TPU lowering via ``jax.export``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from sparsejax.kernels.nm_matmul import (
    BlockSizes,
    PackedNM,
    nm_matmul,
    nm_matmul_reference,
    pack_nm,
    packed_nbytes,
    unpack_nm,
)

from sparsejax.sparsity import nm_mask


def sparse_matrix(k: int, n_cols: int, n: int = 2, m: int = 4, seed: int = 0,
                  dtype=jnp.float32) -> jax.Array:
    w = jax.random.normal(jax.random.key(seed), (k, n_cols), jnp.float32)
    return jnp.where(nm_mask(w, n, m, 0), w, 0.0).astype(dtype)


# --------------------------------------------------------------------------- format


def test_docstring_worked_example():
    w = jnp.zeros((8, 1)).at[:, 0].set(jnp.asarray([0, 5, 0, 7, 3, 0, 0, 2.0]))
    p = pack_nm(w)
    np.testing.assert_array_equal(p.values[:, :2, 0], [[5, 3], [7, 2]])
    np.testing.assert_array_equal(p.meta[:, :2, 0], [[1, 0], [3, 3]])
    assert p.values.shape == (2, 32, 1) and p.meta.shape == (2, 8, 1)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (1, 2)])
@pytest.mark.parametrize("shape", [(8, 3), (128, 64), (4 * 33, 5), (1024, 16)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pack_unpack_round_trip(n, m, shape, dtype):
    w = sparse_matrix(*shape, n=n, m=m, dtype=dtype)
    p = pack_nm(w, n, m)
    assert p.values.dtype == dtype and p.meta.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_nm(p), w)


def test_round_trip_along_axis_1_and_through_jit():
    w = sparse_matrix(64, 12).T  # groups along axis 1
    p = pack_nm(w, axis=1)
    np.testing.assert_array_equal(unpack_nm(p), w)
    jitted = jax.jit(lambda w: unpack_nm(pack_nm(w, prune=True)))
    np.testing.assert_array_equal(jitted(w.T), w.T)


def test_groups_with_fewer_than_n_nonzeros_round_trip():
    w = sparse_matrix(64, 8).at[:4].set(0.0).at[4, 0].set(0.0)
    np.testing.assert_array_equal(unpack_nm(pack_nm(w)), w)


@pytest.mark.parametrize("k, n_cols", [(4096, 4096), (512, 128)])
def test_byte_budget_for_16_bit_weights(k, n_cols):
    p = pack_nm(sparse_matrix(k, n_cols, dtype=jnp.bfloat16))
    dense = k * n_cols * 2
    assert p.meta.size <= dense / 16  # 2 bits per kept value
    assert packed_nbytes(p) <= dense * 9 / 16


def test_packed_is_a_pytree_of_its_arrays():
    p = pack_nm(sparse_matrix(64, 8))
    leaves, treedef = jax.tree.flatten(p)
    assert [leaf.shape for leaf in leaves] == [p.values.shape, p.meta.shape]
    rebuilt = jax.tree.unflatten(treedef, [leaf + 0 for leaf in leaves])
    assert isinstance(rebuilt, PackedNM) and (rebuilt.n, rebuilt.m, rebuilt.shape) == (2, 4,
                                                                                    (64, 8))
    np.testing.assert_array_equal(unpack_nm(rebuilt), unpack_nm(p))


def test_dense_pattern_violation_is_refused_unless_pruning():
    w = jax.random.normal(jax.random.key(0), (16, 4))
    with pytest.raises(ValueError, match=r"has 4 non-zeros, more than n=2; pass prune=True"):
        pack_nm(w)
    p = pack_nm(w, prune=True)
    np.testing.assert_array_equal(unpack_nm(p), jnp.where(nm_mask(w, 2, 4, 0), w, 0.0))


@pytest.mark.parametrize("kwargs, shape, needle", [
    ({"n": 2, "m": 8}, (16, 4), "pattern 2:8 unsupported"),
    ({}, (18, 4), "length 18, not a multiple of m=4"),
    ({}, (4, 4, 4), "expected a 2-D matrix"),
    ({"axis": 2}, (8, 4), "axis=2"),
])
def test_pack_errors_name_the_problem(kwargs, shape, needle):
    with pytest.raises(ValueError, match=needle):
        pack_nm(jnp.zeros(shape), **kwargs)


# --------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("rows", [1, 7, 64, pytest.param(512, marks=pytest.mark.slow)])
@pytest.mark.parametrize("k, n_cols", [(512, 256), (4 * 160, 128)])
@pytest.mark.parametrize("dtype, tol", [
    (jnp.float32, 2e-5), pytest.param(jnp.bfloat16, 2e-2, marks=pytest.mark.slow)])
def test_pallas_matches_reference_forward_and_gradients(rows, k, n_cols, dtype, tol):
    w = sparse_matrix(k, n_cols, seed=rows, dtype=dtype)
    p = pack_nm(w)
    x = jax.random.normal(jax.random.key(100 + rows), (rows, k), jnp.float32).astype(dtype)
    cot = jax.random.normal(jax.random.key(7), (rows, n_cols), jnp.float32)

    def loss(fn, x, values):
        y = fn(x, PackedNM(values, p.meta, 2, 4, p.shape, 0))
        return jnp.sum(y.astype(jnp.float32) * cot)

    ours = lambda x, q: nm_matmul(x, q, backend="pallas")
    y = ours(x, p)
    ref = nm_matmul_reference(x, p)
    assert y.shape == (rows, n_cols) and y.dtype == dtype
    scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) + 1.0
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                               atol=tol * scale, rtol=0)
    g_ours = jax.grad(lambda x, v: loss(ours, x, v), (0, 1))(x, p.values)
    g_ref = jax.grad(lambda x, v: loss(nm_matmul_reference, x, v), (0, 1))(x, p.values)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert a.dtype == b.dtype
        gscale = float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1.0
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=tol * gscale, rtol=0)


def test_leading_batch_axes_and_explicit_block_sizes():
    w = sparse_matrix(1024, 256)
    p = pack_nm(w)
    x = jax.random.normal(jax.random.key(3), (2, 3, 1024))
    y = nm_matmul(x, p, backend="pallas", block_sizes=BlockSizes(8, 128, 128))
    np.testing.assert_allclose(y, x @ w, atol=1e-4, rtol=1e-5)


def test_auto_backend_on_cpu_is_the_xla_reference():
    w = sparse_matrix(128, 128)
    x = jax.random.normal(jax.random.key(4), (4, 128))
    np.testing.assert_array_equal(nm_matmul(x, pack_nm(w)),
                                  nm_matmul_reference(x, pack_nm(w)))


@pytest.mark.parametrize("block_sizes, needle", [
    (BlockSizes(8, 128, 48), "block_g=48 is not a multiple of 32"),
    (BlockSizes(8, 128, 96), "block_g=96 does not divide the 128 padded groups"),
    (BlockSizes(8, 96, 128), "block_n=96 does not divide N=256"),
    (BlockSizes(4, 128, 128), "block_m=4 is not a multiple of 8"),
    (BlockSizes(8, 128, 64), "block_g=64 is neither a multiple of 128 nor the whole axis"),
])
def test_bad_block_sizes_are_readable_errors(block_sizes, needle):
    p = pack_nm(sparse_matrix(512, 256))
    with pytest.raises(ValueError, match=needle):
        nm_matmul(jnp.ones((8, 512)), p, backend="pallas", block_sizes=block_sizes)


def test_mismatched_features_and_transposed_packing_are_refused():
    p = pack_nm(sparse_matrix(64, 8))
    with pytest.raises(ValueError, match="x has 32 features, W has K=64"):
        nm_matmul(jnp.ones((2, 32)), p)
    with pytest.raises(ValueError, match="packed axis must be the contracting axis"):
        nm_matmul(jnp.ones((2, 8)), pack_nm(sparse_matrix(64, 8).T, axis=1))
    with pytest.raises(ValueError, match="backend='triton'"):
        nm_matmul(jnp.ones((2, 64)), p, backend="triton")


# --------------------------------------------------------------------------- lowering


def _export(platform: str, dtype, grad: bool):
    k, n_cols, rows = 1024, 512, 16
    args = (jax.ShapeDtypeStruct((rows, k), dtype),
            jax.ShapeDtypeStruct((2, k // 4, n_cols), dtype),
            jax.ShapeDtypeStruct((2, k // 16, n_cols), jnp.uint8))

    def f(x, values, meta):
        p = PackedNM(values, meta, 2, 4, (k, n_cols), 0)
        return nm_matmul(x, p, backend="pallas", interpret=False, platform=platform)

    fn = f
    if grad:
        def fn(x, values, meta):
            return jax.value_and_grad(lambda x, v: f(x, v, meta).astype(jnp.float32).sum(),
                                      (0, 1))(x, values)
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton_for_cuda(dtype, grad):
    text = _export("cuda", dtype, grad).mlir_module()
    assert "__gpu$xla.gpu.triton" in text
    assert text.count("__gpu$xla.gpu.triton") >= (2 if grad else 1)  # forward + dx kernel


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_mosaic_for_tpu(dtype, grad):
    text = _export("tpu", dtype, grad).mlir_module()
    assert "tpu_custom_call" in text
    assert text.count("tpu_custom_call") >= (2 if grad else 1)
