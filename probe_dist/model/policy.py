"""The policy as one nn.Module with a scoring forward and a decoding step.

Wrapping the causal LM this way lets DDP and FSDP2 wrap a single root whose forward is what the probe calls:
DDP's hooks and FSDP2's unshard/reshard run on every scoring pass, and `decode` is registered as an FSDP forward
method for generation.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from torch import nn

from probe_dist.model.logits import logit_transform
from probe_dist.scoring.chunked import chunked_logp_entropy

# transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name deprecated until 5.40, with a
# FutureWarning per call) and the output's attribute likewise; earlier releases (vLLM's CPU build pins < 5.20)
# know only the old names.
CACHE_KW = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def cache_kwargs(cache) -> dict:
    """{name: cache} for a transformers forward, under the name this transformers release uses."""
    return {CACHE_KW: cache}


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a (peft) model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class PolicyModel(nn.Module):
    """The root module DDP/FSDP2 wrap (runtime/strategy.py): `forward` scores teacher-forced ℓ and H through
    the output head chunk by chunk (memory.logits_chunk rows, with the model's own logit post-processing,
    model/logits.py); `decode` is one cached generation step. lm: a PeftModel or a plain causal LM."""

    def __init__(self, lm: nn.Module, logits_chunk: int = 1024):
        super().__init__()
        self.lm = lm  # PeftModel or plain causal LM
        self.logits_chunk = logits_chunk
        causal = unwrap_causal_lm(lm)
        self.decoder = causal.get_decoder()
        self.head = causal.get_output_embeddings()
        self.logit_transform = logit_transform(getattr(causal, "config", None))  # what the model's forward does after its head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                response_mask: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced ℓ and H for the scored positions (response_mask over columns ≥ response_start).

        Returns flat float32 tensors (float64 for a float64 model) over the True entries of response_mask,
        row-major.
        """
        pred_hidden, targets = self.scored_hidden(input_ids, attention_mask, response_start, response_mask)
        return chunked_logp_entropy(self.head, pred_hidden, targets, temperature=temperature,
                                    chunk=self.logits_chunk, transform=self.logit_transform)

    def scored_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                      response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last hidden state at each position that predicts a scored token, and that token:
        (hidden [M, d] in the model's dtype, targets [M] long), flat over the True entries of response_mask,
        row-major — what `forward` sends through the head."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        mask = attention_mask
        if self._needs_safe_eager_mask(attention_mask):
            mask = eager_padding_mask(attention_mask, self.head.weight.dtype)
        hidden = self.decoder(input_ids=input_ids, attention_mask=mask,
                              position_ids=position_ids, use_cache=False).last_hidden_state
        width = response_mask.shape[1]
        # Position t−1 predicts token t: hidden states of the positions just before each response token.
        pred_hidden = hidden[:, response_start - 1:response_start - 1 + width][response_mask]
        return pred_hidden, self.scored_targets(input_ids, response_start, response_mask)

    @staticmethod
    def scored_targets(input_ids: torch.Tensor, response_start: int, response_mask: torch.Tensor) -> torch.Tensor:
        """The scored tokens [M] long, flat over the True entries of response_mask, row-major."""
        return input_ids[:, response_start:response_start + response_mask.shape[1]][response_mask]

    def _needs_safe_eager_mask(self, attention_mask: torch.Tensor) -> bool:
        """Eager attention (forward-mode passes) on a float64 model with left-padded rows and a plain causal
        architecture: only there would transformers' own mask turn a padded row NaN (`eager_padding_mask`); models
        with sliding-window or other per-layer masks keep their own (a NaN there sends δH₁ to reverse mode)."""
        config = getattr(unwrap_causal_lm(self.lm), "config", None)
        text = getattr(config, "text_config", None) or config
        if getattr(config, "_attn_implementation", None) != "eager" or self.head.weight.dtype != torch.float64:
            return False
        if getattr(text, "sliding_window", None) is not None or getattr(text, "layer_types", None) and any(
                t != "full_attention" for t in text.layer_types):
            return False
        return not bool(attention_mask[:, 0].bool().all())

    def decode(self, input_ids: torch.Tensor, past_key_values=None, position_ids=None, attention_mask=None):
        """One generation step: float32 logits of the last position [n, V] and the updated KV cache (a
        transformers `Cache`). input_ids [n, L] long; past_key_values: the cache a previous call returned (None on
        the first step); attention_mask [n, past + new] marks left padding (None: no padding).

        `past_key_values` is this method's own name (the sampler protocol `rollout.generate.sample_rows` and the
        tests' scripted policies share). Transformers gets it as `cache=` and the cache is read from `out.cache`:
        since transformers 5.24 every built-in model's forward is `@deprecate_kwarg("past_key_values", "5.40.0",
        new_name="cache")` (a FutureWarning per call) and `ModelOutput.past_key_values` is a deprecated alias;
        earlier releases get the old names (`CACHE_KW`)."""
        out = self.lm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=True, logits_to_keep=1, **cache_kwargs(past_key_values))
        return out.logits[:, -1].float(), getattr(out, CACHE_KW)


def eager_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, 1, L, L] additive causal + padding mask for eager attention (the forward-mode passes), with the masked
    value float32's minimum even for a float64 model: transformers' eager attention takes its softmax in float32,
    where float64's minimum becomes −inf and a query row with no visible key (a left-padding position) turns NaN —
    and 0 · NaN reaches every later position through the values. With a finite value such a row is uniform and
    stays finite; it is masked out as a key everywhere else, so real positions are unaffected.

    attention_mask: [n, L] (1 = real token). Returns a tensor in `dtype`."""
    length = attention_mask.shape[-1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=attention_mask.device))
    allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min).unsqueeze(1)

