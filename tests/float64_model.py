"""Float64 models that are float64 throughout: stand-ins for the two transformers functions that compute in
float32 whatever the model's dtype (Qwen2's RMSNorm and eager attention's softmax).

Why: two float64 code paths whose inputs agree to 1e-16 round to float32 differently wherever they straddle a float32
boundary inside those functions — a float32 ulp flipped here and there, which no float64 error model bounds. With
both in the model's dtype, two float64 paths differ by float64 rounding only (`tests.tolerances.two_path_tol64`
bounds that), and a float64 twin of the toy is a reference for its float32 runs (float32 runs are unchanged: the
same operations in float32). The fixtures `float64_norms` and `float64_throughout` (tests/conftest.py) install them.
"""

from __future__ import annotations

import torch


def norm_in_model_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen2RMSNorm.forward without its cast to float32: the same formula in the input's dtype."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def eager_attention_in_model_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' Qwen2 eager_attention_forward with the softmax in the model's dtype (the stock one takes it
    in float32 whatever the dtype): the forward-mode passes of a float64 model are then float64 throughout."""
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv

    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = torch.nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    return torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous(), attn_weights
