"""Converters from logit datasets other tools write into kdcache datasets.

- `distillkit`: DistillKit's Parquet logit datasets (`input_ids`, `bytepacked_indices`,
  `compressed_logprobs`, decoded with the dataset's `compression_config.yaml`).
- `megatron`: Megatron-LM's logits-saver tar shards (`cp{C}_dp{D}__{I}.tar`), with the token
  sequences they were computed on supplied separately (the shards do not hold tokens).

Each converter reads the foreign layout from its own specification (docs/convert.md), never by
running the other tool's code, and writes through DatasetWriter; what a conversion changes is
counted in the output's manifest stats (`convert`).
"""
