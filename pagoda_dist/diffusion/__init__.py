"""Pure-torch diffusion core: EDM preconditioning and loss, PF-ODE sampling and inversion, guidance."""

from .edm import (
    P_MEAN,
    P_STD,
    SIGMA_DATA,
    Denoiser,
    EDMPrecond,
    Preconditioning,
    RawNet,
    edm_loss,
    edm_loss_weight,
    edm_preconditioning,
    generator_output,
    karras_sigmas,
    per_sample_sigma,
    sample_training_sigmas,
)
from .guidance import ClassifierFreeGuidance, concat_conditions
from .ode import SOLVERS, ODEResult, ddim_step, euler_step, heun_step, integrate, invert, sample

__all__ = [
    "ClassifierFreeGuidance",
    "Denoiser",
    "EDMPrecond",
    "ODEResult",
    "P_MEAN",
    "P_STD",
    "Preconditioning",
    "RawNet",
    "SIGMA_DATA",
    "SOLVERS",
    "concat_conditions",
    "ddim_step",
    "edm_loss",
    "edm_loss_weight",
    "edm_preconditioning",
    "euler_step",
    "generator_output",
    "heun_step",
    "integrate",
    "invert",
    "karras_sigmas",
    "per_sample_sigma",
    "sample",
    "sample_training_sigmas",
]
