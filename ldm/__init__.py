"""ldm: two-stage latent diffusion training (Rombach et al. 2022, arXiv 2112.10752)."""

__version__ = "0.1.0"
