"""The hf engine stores each architecture's real next-token distribution: soft-capped (Gemma 2),
biased (Phi-2) and scaled (Cohere, Granite) logits, or refuses a post-processing it does not know.

Each tiny model is built locally with large logits, so that leaving its head's extra step out
changes the stored log-probs by nats, not by rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.teacher_dump.engines.base import EngineConfig, EngineError
from kdcache.teacher_dump.engines.hf import HFEngine
from kdcache.teacher_dump.pack import PackedWindow

V, N, K = 512, 48, 8
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


def _gemma2(path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=32, final_logit_softcapping=30.0))
    model.model.norm.weight.data.fill_(40.0)  # logits in the hundreds: the cap matters
    return model


def _phi(path):
    from transformers import PhiConfig, PhiForCausalLM

    model = PhiForCausalLM(PhiConfig(**SMALL))
    model.lm_head.bias.data = torch.randn(V) * 4.0
    return model


def _cohere(path):
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=6.0))


def _granite(path):
    from transformers import GraniteConfig, GraniteForCausalLM

    model = GraniteForCausalLM(GraniteConfig(**SMALL, logits_scaling=0.1))
    return model


def _window() -> PackedWindow:
    tokens = np.random.default_rng(3).integers(0, V, N).astype(np.int32)
    return PackedWindow(window_index=0, tokens=tokens, doc_offsets=np.array([0, N]),
                        doc_ids=np.array([0]), doc_pieces=np.array([0], dtype=np.int32))


@pytest.mark.parametrize("build", [_gemma2, _phi, _cohere, _granite],
                         ids=["gemma2-softcap", "phi-bias", "cohere-scale", "granite-scaling"])
def test_hf_engine_stores_the_models_own_distribution(tmp_path, build):
    torch.manual_seed(0)
    model = build(tmp_path).eval()
    model.save_pretrained(str(tmp_path / "m"))
    win = _window()
    with torch.no_grad():
        want = model(torch.as_tensor(win.tokens, dtype=torch.long)[None]).logits[0].float()
    want_lp, want_ids = want.log_softmax(-1).topk(K, dim=-1)
    engine = HFEngine(EngineConfig(model=str(tmp_path / "m"), k=K, window=N, mode="causal",
                                   device="cpu"))
    got = engine.topk([win])[0]
    rows = np.flatnonzero(got.valid)
    np.testing.assert_array_equal(got.ids[rows], want_ids.numpy()[rows])
    np.testing.assert_allclose(got.logprobs[rows], want_lp.numpy()[rows], atol=1e-4)
    # the extra step is not a rounding matter: the plain lm_head gives other targets
    plain = torch.as_tensor(engine.weight.detach()).float()
    with torch.no_grad():
        naive = (engine.hidden_states(win.tokens, 0) @ plain.T).log_softmax(-1)
    assert float((naive.topk(K, dim=-1).values - want_lp).abs().max()) > 0.5


def test_an_unknown_logit_postprocessing_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class TripledConfig(LlamaConfig):
        model_type = "kdcache-test-tripled"

    class TripledForCausalLM(LlamaForCausalLM):
        """A Llama whose forward scales its logits with no config field saying so."""

        config_class = TripledConfig

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    AutoConfig.register("kdcache-test-tripled", TripledConfig, exist_ok=True)
    AutoModelForCausalLM.register(TripledConfig, TripledForCausalLM, exist_ok=True)
    torch.manual_seed(0)
    TripledForCausalLM(TripledConfig(**SMALL)).save_pretrained(str(tmp_path / "m"))
    with pytest.raises(EngineError, match=r"own logits differ .* --vllm-path prompt-logprobs"):
        HFEngine(EngineConfig(model=str(tmp_path / "m"), k=K, window=N, mode="causal",
                              device="cpu"))
