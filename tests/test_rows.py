"""fastelbo._rows: N-d tensors read as the [R, D] rows the kernels take, as views where the layout allows
(contiguous, channels_last), a copy otherwise, and results put back in the N-d shape."""

from __future__ import annotations

import pytest
import torch

from fastelbo._rows import reduced_dims, rows_for


def _is_view_of(v, t):
    return v.data_ptr() == t.data_ptr() and v._base is (t if t._base is None else t._base)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_rows_are_views_and_sum_like_torch(fmt):
    t = torch.randn(3, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=fmt)
    for dims in ([1, 2, 3], [1], [2, 3], [0, 1, 2, 3], [3, 1]):
        rows = rows_for(t, reduced_dims(dims, 4))
        r = rows.of(t)
        assert r.dim() == 2
        torch.testing.assert_close(rows.result(r.sum(1)), t.sum(dim=dims), rtol=1e-12, atol=1e-12)
    full = rows_for(t, (1, 2, 3))
    assert _is_view_of(full.of(t), t)  # both layouts: the summed dims merge in memory order, no copy


def test_rows_copy_where_no_view_exists():
    """A channel half of a channels_last tensor (what DiagonalGaussian's mean is) has no [B, D] view."""
    p = torch.randn(2, 6, 3, 4).contiguous(memory_format=torch.channels_last)
    mean = p[:, :3]
    rows = rows_for(mean, (1, 2, 3))
    r = rows.of(mean)
    assert r.data_ptr() != p.data_ptr()
    torch.testing.assert_close(rows.result(r.sum(1)), mean.sum(dim=[1, 2, 3]))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_back_restores_shape_values_and_layout(fmt):
    t = torch.randn(2, 3, 4, 5).contiguous(memory_format=fmt)
    rows = rows_for(t, (1, 2, 3))
    out = rows.back(rows.of(t) * 2, t.shape)
    assert torch.equal(out, t * 2) and out.stride() == t.stride()


def test_reduced_dims():
    assert reduced_dims([1, -1], 4) == (1, 3)
    assert reduced_dims(2, 4) == (2,)
    assert reduced_dims([], 3) == (0, 1, 2)  # torch.sum(t, dim=[]) sums every dim
    with pytest.raises(ValueError, match="dim -5 is out of range for a 4-D tensor"):
        reduced_dims([-5], 4)
    with pytest.raises(ValueError, match="names a dim twice"):
        reduced_dims([1, -3], 4)
    with pytest.raises(TypeError, match="must hold ints"):
        reduced_dims([1.0], 4)
