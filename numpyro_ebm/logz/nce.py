"""The noise-contrastive loss of the learned ``log Z`` (trained alongside the energy in ``fit``).

``fit`` keeps a scalar ``log_z`` and takes an Adam step on ``nce_log_z_loss`` in it at every
training step (``TrainConfig.log_z_learning_rate``), with the negative phase's chains as
samples of the model and the Gaussian fitted to the data (``gaussian.fit_base``) as the noise.
``FitResult.log_z`` reports it (method ``"nce-learned"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from numpyro_ebm.gaussian import GaussianBase

__all__ = ["nce_log_z_loss"]


def nce_log_z_loss(log_z, energy, model_samples, noise_samples, base: GaussianBase):
    """Noise-contrastive loss whose minimiser in ``log_z`` is ``log ∫ exp(−E)``.

    Logistic regression of samples of the model (positives) against samples of the noise
    ``q = base`` (negatives) with the logit ``−E(x) − log_z − log q(x)`` (Gutmann & Hyvärinen
    2010). Only ``log_z`` is trained by it (the energy gets the maximum-likelihood gradient).
    When the positives are exact draws of ``exp(−E)/Z``, the population minimiser is exactly
    ``log Z``: the classes are then ``p`` vs ``q`` and the logit is the true log-ratio. The
    negative-phase chains supply the positives, so no extra sampling is needed.
    """

    def logit(x):
        return -jax.vmap(energy)(x) - log_z - base.log_prob(x)

    pos = logit(jax.lax.stop_gradient(model_samples))
    neg = logit(jax.lax.stop_gradient(noise_samples))
    return jnp.mean(jax.nn.softplus(-pos)) + jnp.mean(jax.nn.softplus(neg))
