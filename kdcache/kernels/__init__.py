"""kdcache.kernels: the fused linear sparse-KL loss (Triton on CUDA, chunked PyTorch reference)."""

from kdcache.kernels.sparse_kl import SparseKLInputError, fused_sparse_kl

__all__ = ["fused_sparse_kl", "SparseKLInputError"]
