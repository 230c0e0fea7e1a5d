"""Each op family (rsample, kl, bernoulli, gaussian, elbo), forward and forward+backward."""

OPS = ["rsample", "kl", "bernoulli", "gaussian", "elbo"]


def test_op(run_benchmark, case, impl):
    run_benchmark(case, impl)
