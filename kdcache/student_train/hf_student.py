"""Any Hugging Face causal LM as the student: masks, positions, the loss's head, RoPE, export.

`HFStudent` wraps a transformers `*ForCausalLM` so that kdcache's trainer (and `kdcache.train_api`)
can drive it like the built-in `Student`: `forward(tokens, seg_ids)` returns the final (normed)
hidden states, `lm_head_weight` / `lm_head_bias` are the model's own output head (tied or not), and
the fused sparse-KL loss applies that head blockwise; the N x V logits never exist.

Masks and positions. The dataset's packing mode decides (attention, positions) as for `Student`
(`model.mode_for_packing`). Position ids are computed here (`rope.positions_for`: global or reset)
and the document mask is built explicitly through the model's own mask interface
(`transformers.masking_utils.create_causal_mask` / `create_sliding_window_causal_mask`, with the
document rule as `and_mask_function`), so sliding windows, the attention implementation's mask
format and each layer type's mask are the model's. The mask is always passed in, never inferred:
transformers would otherwise guess packed sequences from position ids that reset, which with
global positions silently drops document isolation. On CUDA the implementation is FlexAttention
with a document block mask (only unmasked blocks are computed), except for batches of one document
per row in models without sliding layers: no mask is needed there and SDPA's fused causal kernel
is faster; on CPU SDPA with an explicit 4-D boolean mask (FlexAttention has no CPU backward).

What is refused (`refusal_reasons`): logit soft-capping, logit scales, attention soft-capping,
layer types other than full and sliding attention, non-causal models, and any model whose logits
are not `lm_head(final hidden)` or whose attention ignores the document mask. The last two are
measured by `verify_student` on a short random input, so an unknown transform is caught too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from kdcache.errors import ConfigMismatchError, KdcacheError
from kdcache.student_train.model import ATTENTION_MODES, POSITION_MODES, mode_for_packing
from kdcache.student_train.rope import positions_for
from kdcache.student_train.vocab_check import check_vocab, student_vocab, teacher_vocab

log = logging.getLogger("kdcache.train")


class StudentRefusedError(ConfigMismatchError):
    """This model cannot be trained exactly by kdcache; the message names the missing piece."""


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# Config fields that transform the logits (name -> what is missing in the fused loss).
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": "logit soft-capping (tanh on the lm_head output) in the fused "
                               "sparse-KL loss (reference and Triton)",
    "logit_scale": "a logit scale on the lm_head output in the fused sparse-KL loss",
    "logits_scaling": "a logit divisor on the lm_head output in the fused sparse-KL loss",
}
FLEX_IMPL = "kdcache_flex"  # transformers' FlexAttention, q/k/v brought to one dtype first
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model", "chat_template.jinja")


# ---------------------------------------------------------------------------------------------
# What can be trained
# ---------------------------------------------------------------------------------------------

def layer_types(config) -> list[str]:
    """Each decoder layer's attention type, as the model's own forward picks its mask."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * int(config.num_hidden_layers)


def refusal_reasons(config) -> list[str]:
    """Why kdcache cannot train this config exactly (empty when it can)."""
    reasons = []
    name = type(config).__name__
    for field_name, missing in _LOGIT_TRANSFORMS.items():
        value = getattr(config, field_name, None)
        if value not in (None, 1, 1.0):
            reasons.append(f"{name}.{field_name}={value}: needs {missing}")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        reasons.append(f"{name}.attn_logit_softcapping={softcap}: needs attention-score "
                       "soft-capping under a document mask on every backend (SDPA has none)")
    if not getattr(config, "is_causal", True):
        reasons.append(f"{name}.is_causal=False: a bidirectional model has no next-token "
                       "distribution to distil")
    try:
        types = layer_types(config)
    except AttributeError as exc:
        return reasons + [f"{name}: no decoder layer description ({exc})"]
    other = sorted(set(types) - set(SUPPORTED_LAYER_TYPES))
    if other:
        reasons.append(f"{name}.layer_types has {other}: only {list(SUPPORTED_LAYER_TYPES)} "
                       "layers get a document mask")
    return reasons


def check_trainable(config, where: str) -> None:
    reasons = refusal_reasons(config)
    if reasons:
        raise StudentRefusedError(f"{where}: kdcache cannot train this model exactly: "
                                  + "; ".join(reasons))


# ---------------------------------------------------------------------------------------------
# Attention: the model's own interface, one dtype for FlexAttention, explicit document masks
# ---------------------------------------------------------------------------------------------

def _flex_one_dtype(module, query, key, value, attention_mask, **kwargs):
    """transformers' FlexAttention with q, k, v in one dtype: under bf16 autocast the fp32
    residual stream's RoPE (and q/k norms) hand back fp32 q/k next to the projection's bf16 v,
    which SDPA's autocast rule casts and FlexAttention rejects."""
    from transformers.integrations.flex_attention import flex_attention_forward

    dtype = value.dtype
    return flex_attention_forward(module, query.to(dtype), key.to(dtype), value,
                                  attention_mask, **kwargs)


def register_attention() -> None:
    """Register FLEX_IMPL with transformers' attention and mask interfaces (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(FLEX_IMPL, _flex_one_dtype)
    AttentionMaskInterface.register(FLEX_IMPL, flex_attention_mask)


def implementation_for(device: torch.device, config=None, one_document: bool = False) -> str:
    """The attention implementation for a batch: on CUDA FlexAttention, except for a batch of one
    document per row in a model without sliding layers, which needs no mask at all and gets
    SDPA's fused causal kernel (cuDNN / FlashAttention, faster than a causal BlockMask and the
    kernel the usual transformers path runs); on the CPU SDPA with an explicit mask."""
    if device.type != "cuda":
        return "sdpa"
    if one_document and config is not None and set(layer_types(config)) == {"full_attention"}:
        return "sdpa"
    return FLEX_IMPL


def _document_rule(seg_ids: torch.Tensor):
    def same_document(batch_idx, head_idx, q_idx, kv_idx):
        return seg_ids[batch_idx, q_idx] == seg_ids[batch_idx, kv_idx]

    return same_document


def one_document_per_row(seg_ids: torch.Tensor) -> bool:
    """True when every row is one segment without padding: the model's plain causal mask."""
    return bool((seg_ids == seg_ids[:, :1]).all())


def document_masks(config, inputs_embeds: torch.Tensor, seg_ids: torch.Tensor,
                   one_document: bool | None = None):
    """The attention mask(s) for segment ids [B, T], in the model's own format: None for one
    segment per row (the model's plain causal mask), else a 4-D mask or BlockMask, or a dict
    {layer type: mask} for models that mix full and sliding layers."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    if one_document_per_row(seg_ids) if one_document is None else one_document:
        return None
    rule = _document_rule(seg_ids)
    kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=None,
                  past_key_values=None, position_ids=None, and_mask_function=rule)
    types = sorted(set(layer_types(config)))
    masks = {}
    if "full_attention" in types:
        masks["full_attention"] = create_causal_mask(**kwargs)
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks if len(masks) > 1 else next(iter(masks.values()))


# ---------------------------------------------------------------------------------------------
# RoPE parameters (phase-wise RoPE)
# ---------------------------------------------------------------------------------------------

def rope_parameters(config) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        raise StudentRefusedError(f"{type(config).__name__}: no rope_parameters; kdcache can "
                                  "only change RoPE of models that describe it there")
    return params


def rope_theta_of(config) -> float:
    """The base of the model's (global-attention) rotary embedding."""
    params = rope_parameters(config)
    if "rope_theta" not in params and "full_attention" in params:
        params = params["full_attention"]
    return float(params["rope_theta"])


def updated_rope(config, theta: float | None = None,
                 parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config's rope_parameters with a new base (the global layers' for per-layer-type
    parameters such as Gemma 3's) and/or fields merged in."""
    import copy

    params = copy.deepcopy(rope_parameters(config))
    nested = "rope_theta" not in params and "full_attention" in params
    for key, value in (parameters or {}).items():
        if nested and isinstance(value, dict) and isinstance(params.get(key), dict):
            params[key].update(value)
        elif nested and key not in params:
            params["full_attention"][key] = value
        else:
            params[key] = value
    if theta is not None:
        (params["full_attention"] if nested else params)["rope_theta"] = float(theta)
    return params


# ---------------------------------------------------------------------------------------------
# The student
# ---------------------------------------------------------------------------------------------

class HFStudent(nn.Module):
    """A transformers causal LM driven by kdcache: `forward` gives final hidden states [B, T, d]."""

    def __init__(self, model: nn.Module, attention: str = "causal", positions: str = "global",
                 source: str | None = None) -> None:
        super().__init__()
        if attention not in ATTENTION_MODES or positions not in POSITION_MODES:
            raise KdcacheError(f"attention must be in {ATTENTION_MODES} and positions in "
                               f"{POSITION_MODES}; got {attention!r}, {positions!r}")
        check_trainable(model.config, source or type(model).__name__)
        if model.get_output_embeddings() is None:
            raise StudentRefusedError(f"{source or type(model).__name__}: no output embedding "
                                      "(lm_head) to distil into")
        register_attention()
        self.model = model
        self.attention, self.positions = attention, positions
        self.source = source
        model.config.use_cache = False
        self.checkpoint_layers = 0
        self.attn_implementation: str | None = None  # None: per batch (implementation_for)

    # --- the head the loss applies
    @property
    def config(self):
        return self.model.config

    @property
    def decoder(self) -> nn.Module:
        return getattr(self.model, self.model.base_model_prefix)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return getattr(self.model.get_output_embeddings(), "bias", None)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head_weight.shape[0])

    @property
    def rope_theta(self) -> float:
        return rope_theta_of(self.config)

    def decoder_layers(self) -> list[nn.Module]:
        """The decoder's layers (transformers' GradientCheckpointingLayer instances), not the
        decoder itself: compiling that would unroll every layer into one graph (minutes of
        compilation at 28 layers) and checkpoint flags on it would count it as a layer."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in self.decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
        return layers or list(getattr(self.decoder, "layers", []))

    # --- speed knobs (CUDA training)
    def set_checkpoint_layers(self, n: int) -> None:
        """Recompute the activations of the first n decoder layers in backward."""
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        self.checkpoint_layers = n
        for index, layer in enumerate(self.decoder_layers()):
            layer.gradient_checkpointing = index < n
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """torch.compile each decoder layer in place (fuses norms, RoPE, MLP; CUDA training)."""
        for layer in self.decoder_layers():
            layer.compile(**compile_kwargs)

    # --- forward
    def position_ids(self, seg_ids: torch.Tensor) -> torch.Tensor:
        return positions_for(seg_ids, self.positions)

    def forward(self, tokens: torch.Tensor, seg_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> final hidden states [B, T, d] (seg_ids: document id per position,
        negative for padding; None means one document per row)."""
        if seg_ids is None:
            seg_ids = torch.zeros_like(tokens, dtype=torch.int32)
        if self.attention == "causal":  # cross-document attention: only padding is kept apart
            seg_ids = torch.where(seg_ids < 0, seg_ids, torch.zeros_like(seg_ids))
        if positions is None:
            positions = self.position_ids(seg_ids)
        one_document = one_document_per_row(seg_ids)
        impl = self.attn_implementation or implementation_for(tokens.device, self.config,
                                                              one_document)
        if self.config._attn_implementation != impl:
            self.config._attn_implementation = impl
        embeds = self.model.get_input_embeddings()(tokens)
        mask = document_masks(self.config, embeds, seg_ids, one_document)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                           use_cache=False)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits for short evaluation inputs; training never calls this."""
        return self.model.get_output_embeddings()(hidden)

    # --- phase-wise RoPE
    def set_rope(self, theta: float | None = None,
                 parameters: dict[str, Any] | None = None) -> None:
        """A new RoPE base / parameters with the same weights: rebuilds the rotary module(s)."""
        if theta is None and not parameters:
            return
        self.config.rope_parameters = updated_rope(self.config, theta, parameters)
        if hasattr(self.config, "rope_theta") and theta is not None:
            self.config.rope_theta = float(theta)
        for parent in list(self.decoder.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child).__name__.endswith("RotaryEmbedding"):
                    buffers = list(child.buffers())
                    device = buffers[0].device if buffers else None
                    setattr(parent, child_name, type(child)(config=self.config).to(device))

    # --- export
    def save(self, directory: str, dtype: torch.dtype = torch.bfloat16,
             extra_config: dict[str, Any] | None = None) -> str:
        """Write an HF directory of the same architecture (config.json + safetensors, and the
        source's tokenizer files), atomically."""
        parent = os.path.dirname(os.path.abspath(directory)) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-hf-", dir=parent)
        try:
            state = {name: t.detach().to("cpu", dtype) if t.is_floating_point() else t.cpu()
                     for name, t in self.model.state_dict().items()}
            impl = self.config._attn_implementation
            self.config._attn_implementation = "sdpa"  # what a reader gets by default
            old_dtype = getattr(self.config, "dtype", None)
            self.config.dtype = dtype
            try:
                self.model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            finally:
                self.config._attn_implementation = impl
                self.config.dtype = old_dtype
            config_path = os.path.join(tmp, "config.json")
            with open(config_path) as handle:
                config = json.load(handle)
            config["kdcache"] = {"attention": self.attention, "positions": self.positions}
            config.update(extra_config or {})
            with open(config_path, "w") as handle:
                json.dump(config, handle, indent=2)
            if self.source and os.path.isdir(self.source):
                copy_tokenizer_files(self.source, tmp)
            if os.path.exists(directory):
                shutil.rmtree(directory)
            os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory


def copy_tokenizer_files(src: str, dst: str) -> None:
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)) and not os.path.exists(os.path.join(dst, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_hf_student(path: str, *, init: str = "pretrained", attention: str = "causal",
                    positions: str = "global", rope_theta: float | None = None,
                    rope: dict[str, Any] | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float32, verify: bool = True) -> HFStudent:
    """An HF causal-LM directory as a student: its weights as they are (init="pretrained") or a
    random initialisation from its config (init="random"), optionally with a new RoPE."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if init not in ("pretrained", "random"):
        raise KdcacheError(f"init must be 'pretrained' or 'random', got {init!r}")
    if not is_hf_dir(path):
        raise KdcacheError(f"{path}: no config.json; not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise KdcacheError(f"{path}: transformers cannot read this config ({exc})") from None
    check_trainable(config, path)
    try:
        if init == "pretrained":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                         attn_implementation="sdpa")
        else:
            config._attn_implementation = "sdpa"
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as exc:
        raise StudentRefusedError(f"{path}: not a causal LM transformers can build ({exc})") from None
    student = HFStudent(model, attention=attention, positions=positions, source=path)
    student.set_rope(rope_theta, rope)
    if verify:
        verify_student(student, path)
    return student


def student_from_config(config, *, attention: str = "document", positions: str = "global",
                        seed: int = 0, dtype: torch.dtype = torch.float32,
                        device: str | torch.device | None = None) -> HFStudent:
    """A randomly initialised student from a transformers config object (tests, benchmarks)."""
    from transformers import AutoModelForCausalLM

    check_trainable(config, type(config).__name__)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return HFStudent(model, attention=attention, positions=positions)


@torch.no_grad()
def verify_student(student: HFStudent, where: str, length: int = 24) -> None:
    """Refuse a model whose logits are not lm_head(hidden) or whose attention leaks across the
    document mask, measured on a short random input in float32 on the CPU."""
    device = student.lm_head_weight.device
    if device.type != "cpu":
        return  # checked where it was loaded
    was_training = student.training
    student.eval()
    try:
        g = torch.Generator().manual_seed(0)
        vocab = min(student.vocab_size, int(student.config.vocab_size))
        tokens = torch.randint(0, vocab, (1, length), generator=g)
        split = length // 3
        seg = torch.zeros(1, length, dtype=torch.int32)
        seg[:, split:] = 1
        hidden = student(tokens, seg)
        # 1. the logits the model itself computes (on the second document alone, positions 0..)
        alone = tokens[:, split:]
        model_logits = student.model(input_ids=alone, use_cache=False).logits.float()
        head_logits = student.logits(student(alone)).float()
        scale = model_logits.abs().max().clamp_min(1e-6)
        if float((model_logits - head_logits).abs().max() / scale) > 1e-4:
            raise StudentRefusedError(
                f"{where}: the model's logits are not lm_head(final hidden states) (an unknown "
                "logit transform); the fused loss would train another function")
        # 2. the document mask holds: a packed document equals the same document alone
        if student.attention == "document":
            pos = student.position_ids(seg)
            second_alone = student(alone, None, pos[:, split:])
            diff = (hidden[:, split:] - second_alone).abs().max()
            if float(diff / second_alone.abs().max().clamp_min(1e-6)) > 1e-4:
                raise StudentRefusedError(
                    f"{where}: the model's attention does not honour an explicit document "
                    "mask (a custom attention path); packed training would leak across documents")
    finally:
        student.train(was_training)


def hf_student_spec(stage, header, where: str, path: str, init: str):
    """What `load_hf_student` gets for one training stage on a dataset, after the checks that
    need no weights: the mask/positions the data needs, refusals, and the vocabulary check.
    Returns (keyword arguments, the student's lm_head rows, the vocabulary verdict)."""
    from transformers import AutoConfig

    cfg = stage.model
    if cfg.overrides:
        raise KdcacheError(f"{where}: model.overrides {sorted(cfg.overrides)} shape the built-in "
                           f"student; an HF student's shape is its config.json ({path})")
    attention, positions = mode_for_packing(header.packing["mode"], cfg.attention, cfg.positions,
                                            force=cfg.force_mode, where=where)
    if not is_hf_dir(path):
        raise KdcacheError(f"{path}: no config.json; not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_trainable(config, path)
    rows = int(config.get_text_config().vocab_size)
    if isinstance(cfg.vocab_size, int) and cfg.vocab_size != rows:
        raise ConfigMismatchError(f"{where}: model.vocab_size {cfg.vocab_size}, but the HF "
                                  f"student {path} has {rows} lm_head rows")
    tokenizer = cfg.tokenizer or (path if os.path.exists(os.path.join(path, "tokenizer.json"))
                                  else None)
    verdict = check_vocab(student_vocab(rows, tokenizer, f"HF student {path}"),
                          teacher_vocab(header, where))
    log.info("%s: %s", where, verdict)
    spec = {"path": path, "init": init, "attention": attention, "positions": positions,
            "rope_theta": cfg.rope_theta, "rope": dict(cfg.rope) or None, "seed": cfg.init_seed}
    return spec, rows, verdict
