"""One argument order across the library (fastelbo/_argorder.py, docs/migration.md) and the errors and
warnings that point at a swapped call or a decoder still ending in sigmoid (fastelbo/_logits_check.py).

Issue 21: elbo(x, recon, ...) but ELBOLoss()(recon, x, ...); a swapped call got "x must lie in [0, 1]
... (pass validate_args=False to skip this check)"; a sigmoid decoder's probabilities fed as logits
gave silently wrong numbers."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastelbo
from fastelbo import _argorder, _logits_check
from fastelbo import functional as F
from fastelbo import reference as R

from helpers import assert_close

B, DX, DZ, K = 5, 12, 3, 4


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(21)
    return dict(x=torch.rand(B, DX, generator=g).round(), recon=torch.randn(B, DX, generator=g) * 3,
                recon_k=torch.randn(K, B, DX, generator=g) * 3, z=torch.randn(K, B, DZ, generator=g),
                mu=torch.randn(B, DZ, generator=g), logvar=torch.randn(B, DZ, generator=g) * 0.5)


@pytest.fixture
def fresh():
    """Each once-per-process warning fires again in this test."""
    _argorder._warned_ambiguous.clear()
    _logits_check._checked.clear()
    yield
    _argorder._warned_ambiguous.clear()
    _logits_check._checked.clear()


def test_recon_first_matches_the_module_and_the_reference(fused, data):
    d = data
    kw = dict(recon=d["recon"], x=d["x"], mu=d["mu"], logvar=d["logvar"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keywords: no order warning
        by_name = F.elbo(**kw, backend=fused.name).elbo
        by_name_reversed = F.elbo(x=d["x"], recon=d["recon"], mu=d["mu"], logvar=d["logvar"], backend=fused.name).elbo
        module = fastelbo.ELBOLoss(reduction="none", backend=fused.name)(d["recon"], d["x"], d["mu"], d["logvar"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastelbo.ArgumentOrderWarning)
        positional = F.elbo(d["recon"], d["x"], d["mu"], d["logvar"], backend=fused.name).elbo
    ref = R.elbo(**kw).elbo
    assert_close(by_name, ref, n=DX, name="elbo")
    assert torch.equal(by_name, by_name_reversed) and torch.equal(by_name, positional)
    assert torch.equal(module, -by_name)


def test_old_order_told_apart_by_shape_warns_and_is_computed_as_meant(data, fresh):
    d = data
    new = F.iwae_bound(d["recon_k"], d["x"], d["z"], d["mu"], d["logvar"])
    with pytest.warns(fastelbo.ArgumentOrderWarning, match=r"iwae_bound\(x, recon, \.\.\.\) is the fastelbo 0\.1"):
        old = F.iwae_bound(d["x"], d["recon_k"], d["z"], d["mu"], d["logvar"])
    assert torch.equal(new, old)
    with pytest.warns(fastelbo.ArgumentOrderWarning, match=r"elbo\(x, recon, \.\.\.\)"):
        old_k = F.elbo(d["x"], d["recon_k"], d["mu"], d["logvar"]).elbo
    assert torch.equal(old_k, F.elbo(recon=d["recon_k"], x=d["x"], mu=d["mu"], logvar=d["logvar"]).elbo)
    with warnings.catch_warnings():  # a mismatched K-sample shape is not taken for the old order
        warnings.simplefilter("error", fastelbo.ArgumentOrderWarning)
        with pytest.raises(ValueError, match=r"\bx\b must|\brecon\b"):  # read in the new order: a shape error
            F.elbo(d["x"], d["recon_k"][:, :, :-1], d["mu"], d["logvar"])
    with pytest.warns(fastelbo.ArgumentOrderWarning):  # the reference takes the same order
        assert torch.equal(R.iwae_bound(d["x"], d["recon_k"], d["z"], d["mu"], d["logvar"]),
                           R.iwae_bound(recon=d["recon_k"], x=d["x"], z=d["z"], mu=d["mu"], logvar=d["logvar"]))


def test_same_shape_positional_call_is_read_as_recon_x_and_says_so_once(data, fresh):
    d = data
    with pytest.warns(fastelbo.ArgumentOrderWarning, match=r"read as \(recon, x\).*once per process"):
        first = F.elbo(d["recon"], d["x"], d["mu"], d["logvar"]).elbo
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = F.elbo(d["recon"], d["x"], d["mu"], d["logvar"]).elbo  # once per process
    assert torch.equal(first, again)
    assert_close(first, R.elbo(recon=d["recon"], x=d["x"], mu=d["mu"], logvar=d["logvar"]).elbo, n=DX, name="elbo")


def test_binding_errors_name_the_argument(data):
    d = data
    with pytest.raises(TypeError, match="multiple values for argument 'recon'"):
        F.elbo(d["recon"], d["x"], d["mu"], d["logvar"], recon=d["recon"])
    with pytest.raises(TypeError, match=r"missing required argument 'logvar' \(call it as elbo\(recon, x, mu, "
                                        r"logvar, \.\.\.\)\)"):
        F.elbo(d["recon"], d["x"], d["mu"])
    with pytest.raises(TypeError, match="at most 5 positional"):
        F.iwae_bound(d["recon_k"], d["x"], d["z"], d["mu"], d["logvar"], 0.0)


def test_swapped_bernoulli_call_gets_a_message_that_points_at_the_swap(data, fused, fresh):
    d = data
    with pytest.raises(ValueError) as info:
        F.elbo(recon=d["x"], x=d["recon"], mu=d["mu"], logvar=d["logvar"], backend=fused.name)
    msg = str(info.value)
    assert "x (the data, argument 2 of elbo(recon, x, ...)) must lie in [0, 1]" in msg
    assert "recon holds only 0s and 1s, like data: the two look swapped" in msg
    assert "validate_args=False" not in msg  # no invitation to switch the check off
    with pytest.raises(ValueError, match=r"logits holds only 0s and 1s.*look swapped"):
        F.bernoulli_log_prob(d["x"], d["recon"], backend=fused.name)


def test_targets_out_of_range_without_a_swap_suggest_scaling(data):
    d = data
    with pytest.raises(ValueError, match=r"holds values from 0 to 255\. Scale the data to \[0, 1\]"):
        F.elbo(recon=d["recon"], x=d["x"] * 255, mu=d["mu"], logvar=d["logvar"])


def test_probabilities_as_logits_warn_once_on_the_first_call(data, fused, fresh, monkeypatch):
    d = data
    monkeypatch.delenv("FASTELBO_LOGITS_CHECK", raising=False)
    probs = torch.sigmoid(d["recon"])
    with pytest.warns(fastelbo.LogitsWarning, match=r"every value of recon \(the Bernoulli logits\) lies in "
                                                    r"\[0, 1\].*ends in sigmoid"):
        F.elbo(recon=probs, x=d["x"], mu=d["mu"], logvar=d["logvar"], backend=fused.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls read nothing
        F.elbo(recon=probs, x=d["x"], mu=d["mu"], logvar=d["logvar"], backend=fused.name)
    with pytest.warns(fastelbo.LogitsWarning, match="logits"):
        F.bernoulli_log_prob(probs, d["x"], backend=fused.name)


def test_real_logits_and_the_switch_give_no_warning(data, fresh, monkeypatch):
    d = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.elbo(recon=d["recon"], x=d["x"], mu=d["mu"], logvar=d["logvar"])
        F.elbo(recon=d["x"], x=d["x"], mu=d["mu"], logvar=d["logvar"], likelihood="gaussian")
        monkeypatch.setenv("FASTELBO_LOGITS_CHECK", "0")
        _logits_check._checked.clear()
        F.elbo(recon=torch.sigmoid(d["recon"]), x=d["x"], mu=d["mu"], logvar=d["logvar"])


def test_the_check_reads_no_values_under_compile_tracing(data, fresh):
    d = data
    probs = torch.sigmoid(d["recon"])
    fn = torch.compile(lambda r, x, m, lv: F.elbo(recon=r, x=x, mu=m, logvar=lv, backend="reference").elbo,
                       fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastelbo.LogitsWarning)
        fn(probs, d["x"], d["mu"], d["logvar"])
    assert "elbo" not in _logits_check._checked  # traced, not checked: the first eager call will be


def test_reduction_mean_averages_row_sums_not_elements(data):
    # What the README says against nn.BCEWithLogitsLoss: "mean" is over the batch of per-row sums.
    d = data
    zero_kl = dict(mu=torch.zeros(B, DZ), logvar=torch.zeros(B, DZ))
    loss = fastelbo.ELBOLoss(reduction="mean")(d["recon"], d["x"], **zero_kl)
    bce_sum = torch.nn.BCEWithLogitsLoss(reduction="sum")(d["recon"], d["x"])
    bce_mean = torch.nn.BCEWithLogitsLoss(reduction="mean")(d["recon"], d["x"])
    assert_close(loss, bce_sum / B, n=B * DX, name="mean")
    assert_close(loss, bce_mean * DX, n=B * DX, name="mean")
    assert_close(fastelbo.ELBOLoss(reduction="sum")(d["recon"], d["x"], **zero_kl), bce_sum, n=B * DX, name="sum")
