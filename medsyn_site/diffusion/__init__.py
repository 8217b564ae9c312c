"""The mask-conditioned patch-wise 3-D DDPM: network, patches, DeepSpeed engine, trainer."""
