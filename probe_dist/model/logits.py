"""The model's own post-processing of its output-head logits, applied by the chunked scorer.

The sampler calls the model's full forward, which post-processes `lm_head(hidden)` in architecture-specific ways;
the scorer computes the head itself, chunk by chunk, so it must apply the same steps or ℓ, H and the importance
weights come from another distribution than the samples. Known steps, read from the model config (the names
transformers uses):

- `final_logit_softcapping` c (Gemma-2, Gemma-3 and others): z ← c·tanh(z/c)
- `logit_scale` s (Cohere, Cohere-2): z ← z·s
- `logits_scaling` d (Granite family): z ← z/d

Anything else (remote-code heads, history-dependent position encodings) is caught by the start-up consistency
check (`scoring/consistency.py`), which refuses the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """z ↦ the model's logits: multiply by `scale`, divide by `divide`, then soft-cap at `softcap` (if set)."""

    scale: float | None = None
    divide: float | None = None
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        """Whether the transform leaves the logits unchanged (no scale, divisor or soft-cap)."""
        return self.scale is None and self.divide is None and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] (any float dtype) → the same shape and dtype, post-processed as the model's forward."""
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> str:
        """The transform for messages, e.g. "×0.0625, soft-cap 30.0"; "none" for the identity."""
        parts = [f"×{self.scale}" if self.scale is not None else "", f"÷{self.divide}" if self.divide is not None else "",
                 f"soft-cap {self.softcap}" if self.softcap is not None else ""]
        return ", ".join(p for p in parts if p) or "none"


def logit_transform(config) -> LogitTransform:
    """The post-processing a transformers causal LM with this config applies after its output head.

    config: a transformers PretrainedConfig (multimodal configs: their text_config), or None. Returns an identity
    transform for architectures that use the head's logits as they are (Llama, Qwen, Mistral, Phi, GPT-2, OLMo).
    """
    text = getattr(config, "text_config", None) or config
    def number(name: str) -> float | None:
        value = getattr(text, name, None)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    scale = number("logit_scale")
    divide = number("logits_scaling")
    return LogitTransform(scale=None if scale == 1.0 else scale, divide=None if divide == 1.0 else divide,
                          softcap=number("final_logit_softcapping"))
