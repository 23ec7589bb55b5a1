"""Stand-ins for an external rollout engine (rollout.backend=vllm) in the main suite: samplers whose distribution
q is deliberately not π_θ, reporting each response's log q as a vLLM engine does (docs/method.md §13)."""

from __future__ import annotations

import torch

from probe_dist.rollout.generate import sample_rows


class TemperedSampler:
    """The policy's own decoding loop at temperature τ_q instead of the probe's τ: q = softmax(z/τ_q), a sampler
    that is off by a known amount, with log q(y) = Σ_t log softmax(z/τ_q)[y_t] reported per response."""

    def __init__(self, decoder, temperature: float, device: torch.device | None = None):
        self.decoder, self.temperature, self.device = decoder, temperature, device or torch.device("cpu")

    def sample_rows(self, prompts, row_prompt, keys, *, max_new_tokens: int, temperature: float, eos_ids, pad_id: int):
        del temperature  # the point: this sampler does not draw at the probe's τ
        return sample_rows(self.decoder, prompts, row_prompt, keys, max_new_tokens=max_new_tokens,
                           temperature=self.temperature, eos_ids=eos_ids, pad_id=pad_id, device=self.device,
                           return_logp=True)

