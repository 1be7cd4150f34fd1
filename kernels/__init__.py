"""Attention kernels: readable PyTorch references and fused Triton kernels.

This package imports only torch (and triton lazily, when a Triton backend is
used); importing it never touches a GPU driver. No model code lives here.
"""
