"""Math only: attention, MoE and sampling kernels behind backend registries."""
