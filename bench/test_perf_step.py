"""The training step of the loss: z = rsample(mu, logvar); loss = ELBOLoss()(recon, x, mu, logvar)
(Bernoulli, mean); backward from loss and z. Eager draws eps with torch.randn as users do."""

OPS = ["step"]


def test_step(run_benchmark, case, impl):
    run_benchmark(case, impl)
