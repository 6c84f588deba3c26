"""Fused elementwise kernels of the decoder layers (Triton, CUDA): residual add + RMSNorm,
rotary on q and k, SiLU·up. Each kernel file holds its torch reference beside the launcher;
``dispatch`` decides when the layers in ``workers/layers`` use them."""
