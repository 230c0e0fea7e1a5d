"""fastelbo._rows: N-d tensors read as the [R, D] rows the kernels take, as views where the layout allows
(contiguous, channels_last), a copy otherwise, and results put back in the N-d shape."""

from __future__ import annotations

import pytest
import torch

from fastelbo._rows import Trailing, reduced_dims, rows_for


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


# ---------------------------------------------------------------------------
# Trailing: the [B, *] / [K, B, *] inputs of the ops as [B, D] / [K, B, D].
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("lead", [1, 2])
@pytest.mark.parametrize("ndim", [3, 4, 5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_trailing_views_and_back(layout, ndim, lead):
    shape = (2,) * (lead - 1) + (3, 4, 5, 2, 3)[:ndim]
    t = torch.randn(shape)
    if layout == "channels_last":  # the channel dim (first trailing) innermost in memory
        c = lead
        order = [d for d in range(t.dim()) if d != c] + [c]
        t = t.permute(order).contiguous().permute(sorted(range(t.dim()), key=order.__getitem__))
    f = Trailing.of(t, lead)
    v = f(t, lead)
    assert v.shape == t.shape[:lead] + (f.features,) and _is_view_of(v, t)
    assert f.logical == (layout == "contiguous" or ndim - 1 == 1)
    back = f.back(v * 3, lead)
    assert torch.equal(back, t * 3) and back.stride() == t.stride()
    torch.testing.assert_close(v.sum(-1), t.sum(dim=list(range(lead, t.dim()))))


def test_trailing_broadcast():
    mu = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    f = Trailing.of(mu, 1)
    for p in (torch.randn(4, 1, 1), torch.randn(5, 6), torch.randn(1, 4, 5, 6), torch.randn(3, 4, 1, 1),
              torch.randn(mu.shape)):
        b = f.broadcast(p, "prior_mu", mu, "mu")
        assert b.shape == ((3 if p.dim() == 4 and p.shape[0] == 3 else 1), 120)
        torch.testing.assert_close(f.back(b.expand(3, 120), 1), p.expand(mu.shape))
    assert f.broadcast(0.5, "prior_mu", mu, "mu") == 0.5
    s = torch.tensor(0.5)
    assert f.broadcast(s, "prior_mu", mu, "mu") is s
    with pytest.raises(ValueError, match=r"prior_mu of shape \(6, 1\) must broadcast to mu.s shape \(3, 4, 5, 6\)"):
        f.broadcast(torch.randn(6, 1), "prior_mu", mu, "mu")
    with pytest.raises(ValueError, match=r"must broadcast"):
        f.broadcast(torch.randn(2, 3, 4, 5, 6), "prior_mu", mu, "mu")
