"""The one EDM/consistency core shared by teacher training, distillation and sampling."""
from .karras import RHO, karras_sigmas
from .precond import ConsistencyFunction, EDMDenoiser, conditioned, consistency_scalings, edm_scalings
from .solvers import (consistency_sample, edm_sample, euler_sample, euler_step, heun_sample, heun_step,
                      refine_sample)

__all__ = [
    "RHO",
    "karras_sigmas",
    "edm_scalings",
    "consistency_scalings",
    "EDMDenoiser",
    "ConsistencyFunction",
    "conditioned",
    "euler_step",
    "heun_step",
    "heun_sample",
    "edm_sample",
    "consistency_sample",
    "euler_sample",
    "refine_sample",
]
