"""jaxdpdm: differentially private diffusion models in JAX/Flax.

Reimplements *Differentially Private Diffusion Models Generate Useful Synthetic Images*
(Ghalebikesabi et al., 2023): non-private pretraining of a class-conditional diffusion UNet,
DP-SGD fine-tuning on sensitive images, sampling of synthetic data, and its evaluation.
"""

__version__ = "0.1.0"
