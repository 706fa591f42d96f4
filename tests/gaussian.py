"""The analytic test bed shared by the core tests: data ~ N(mu, s^2 I), where the EDM denoiser,
the PF-ODE map and the consistency function are all known in closed form."""
import math

import torch

F64 = torch.float64
MU = torch.tensor([0.3, -0.5, 0.1, 0.7], dtype=F64)
S = 0.4
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _col(sigma, x):
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def _mu_like(x, mu=MU):
    return mu.reshape(1, *x.shape[1:]) if x.ndim > 2 else mu


def exact_denoiser(x, sigma, mu=MU, s=S):
    m, sig = _mu_like(x, mu), _col(sigma, x)
    return m + s ** 2 / (s ** 2 + sig ** 2) * (x - m)


def exact_consistency(x, sigma, mu=MU, s=S, sigma_min=SIGMA_MIN):
    m, sig = _mu_like(x, mu), _col(sigma, x)
    return m + (x - m) * math.sqrt(s ** 2 + sigma_min ** 2) / (s ** 2 + sig ** 2).sqrt()


def exact_flow(x, sigma_a, sigma_b, mu=MU, s=S):
    """The exact PF-ODE map from sigma_a to sigma_b."""
    m = _mu_like(x, mu)
    return m + (x - m) * math.sqrt(s ** 2 + sigma_b ** 2) / math.sqrt(s ** 2 + sigma_a ** 2)


# Class-conditional data: class c ~ N(CLASS_MUS[c], s^2 I), where the conditional denoiser and
# consistency function are the formulas above with the row's own class mean.
CLASS_MUS = torch.stack([MU, -MU, MU.flip(0)])


def _class_mu(x, class_labels):
    return CLASS_MUS[class_labels].reshape(x.shape)


def exact_class_denoiser(x, sigma, class_labels, s=S):
    m, sig = _class_mu(x, class_labels), _col(sigma, x)
    return m + s ** 2 / (s ** 2 + sig ** 2) * (x - m)


def exact_class_consistency(x, sigma, class_labels, s=S, sigma_min=SIGMA_MIN):
    m, sig = _class_mu(x, class_labels), _col(sigma, x)
    return m + (x - m) * math.sqrt(s ** 2 + sigma_min ** 2) / (s ** 2 + sig ** 2).sqrt()
