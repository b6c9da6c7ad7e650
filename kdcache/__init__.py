"""kdcache: offline logit knowledge distillation.

Four components, one per subpackage, along the data path:
  teacher_dump  corpus -> tokenize -> pack -> teacher top-k -> shards
  formats       the shard format: manifest, codecs, writer, reader, verify
  kernels       fused sparse-KL over the lm_head (Triton) and its PyTorch reference
  student_train Lightning trainer, RoPE schedule, evaluation and analysis
"""

__version__ = "0.1.0"
