"""medsyn-site: synthetic lung CT + nodule masks from a mask-conditioned patch-wise 3D DDPM."""

__version__ = "0.1.0"
