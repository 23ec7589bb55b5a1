"""The reward model r_φ of GRADE, reading relaxed (soft) tokens (docs/method.md §4.2).

Any transformers sequence-classification model with one label and a linear `score` head (the layout of
`AutoModelForSequenceClassification` for Llama, Qwen2, Mistral, Gemma, … and of TRL's RewardTrainer) over the
policy's vocabulary: r_φ(prompt, y_1..T) = score(h_last) where h is its backbone run on
[E_φ[prompt ids] ; y_1ᵀE_φ … y_Tᵀ E_φ] — HF's pooling of an unpadded row (the last position). Loaded from
safetensors only, frozen, in the probe's dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from probe_dist.errors import UserInputError
from probe_dist.update.relax import SoftToken, soft_embedding


class RewardModelError(UserInputError):
    """The reward model GRADE needs is missing or unusable."""


class RewardModel:
    """r_φ over relaxed tokens. `shared`: its backbone is the policy's frozen base itself (same class, same
    weights, same outputs), so only its score head is kept and the reward is read off the reference's pass
    over the rollout (update/grade.py) — one frozen base for reference and reward model."""

    def __init__(self, model: torch.nn.Module, embed: str = "auto"):
        self.model, self.embed, self.shared = model, embed, False
        self.backbone = model.base_model
        self.score = model.score
        self.embedding = model.get_input_embeddings()

    def share_base(self, causal_lm: torch.nn.Module, reference) -> bool:
        """Drop this model's backbone when it is the policy's base: `causal_lm` the policy's (peft-injected)
        *ForCausalLM, `reference()` the context that disables the adapter. The test is exact: same backbone
        class, and bit-identical hidden states on a probe input under the reference. Returns `shared`."""
        backbone = getattr(causal_lm, "base_model", None) if not hasattr(causal_lm, "get_decoder") else \
            causal_lm.get_decoder()
        if backbone is None or type(backbone) is not type(self.backbone):
            return False
        ids = torch.arange(min(8, self.embedding.weight.shape[0]), device=self.embedding.weight.device).unsqueeze(0)
        with torch.no_grad(), reference():
            try:
                theirs = backbone(input_ids=ids, use_cache=False).last_hidden_state
            except Exception:  # noqa: BLE001 - any mismatch means "not the same model"
                return False
        with torch.no_grad():
            ours = self.backbone(input_ids=ids, use_cache=False).last_hidden_state
        base_embedding = backbone.get_input_embeddings().weight
        if ours.shape != theirs.shape or not torch.equal(ours, theirs) or \
                base_embedding.shape != self.embedding.weight.shape or \
                not torch.equal(base_embedding, self.embedding.weight):
            return False
        self.shared, self.model, self.backbone, self.embedding = True, None, None, None
        return True

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype, device: torch.device, vocab_size: int,
             embed: str = "auto") -> RewardModel:
        """The reward model in `path` (config.json + *.safetensors), frozen, eval mode, on `device`.

        Raises RewardModelError (exit 2) when the folder is missing, holds no safetensors weights, is not a
        one-label sequence classifier with a linear `score` head, its weight files lack a parameter (the
        `score` head of a causal LM saved as a reward model), or its embedding rows differ from the policy's
        vocabulary size (soft tokens are distributions over the policy's token ids)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from probe_dist.state.checks import check_loading_info

        folder = Path(path)
        if not folder.is_dir():
            raise RewardModelError(f"update.reward_model {str(folder)!r} does not exist or is not a folder; point it "
                                   "at a transformers sequence-classification model folder (save_pretrained of a "
                                   "reward model with one label).")
        if not (folder / "config.json").is_file():
            raise RewardModelError(f"update.reward_model {str(folder)!r} holds no config.json; point it at a "
                                   "transformers sequence-classification model folder (save_pretrained of a reward "
                                   "model with one label, e.g. TRL's RewardTrainer output).")
        from probe_dist.state.bounds import check_safetensors_header
        from probe_dist.state.checks import read_json

        read_json(folder / "config.json", "the reward model's config", "Re-save the reward model with save_pretrained.",
                  finite=True)
        for f in sorted(folder.glob("*.safetensors")):  # within the reading bounds before the loader reads them
            check_safetensors_header(f, "reward model weight file")
        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (ValueError, OSError) as exc:
            raise RewardModelError(f"update.reward_model {str(folder)!r}: its config.json cannot be read ({exc}); "
                                   "re-save the reward model with save_pretrained.") from None
        architectures = list(getattr(config, "architectures", None) or [])
        if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise RewardModelError(f"update.reward_model {str(folder)!r} is a {', '.join(architectures)}, not a "
                                   "*ForSequenceClassification model: a reward model maps a sequence to one score "
                                   "(e.g. TRL's RewardTrainer output, or AutoModelForSequenceClassification with "
                                   "num_labels=1).")
        if not any(folder.glob("*.safetensors")):
            raise RewardModelError(f"update.reward_model {str(folder)!r} has no *.safetensors weights; the probe never "
                                   "unpickles weights. Re-save it with save_pretrained(safe_serialization=True).")
        if getattr(config, "num_labels", None) != 1:
            raise RewardModelError(f"update.reward_model {str(folder)!r} has num_labels={config.num_labels}; a "
                                   "reward model has one scalar output (num_labels=1).")
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(folder), dtype=dtype, use_safetensors=True, local_files_only=True, output_loading_info=True)
        except (ValueError, OSError) as exc:
            raise RewardModelError(f"update.reward_model {str(folder)!r} could not be loaded as a sequence "
                                   f"classifier: {exc}") from None
        check_loading_info(info, f"update.reward_model {str(folder)!r}", RewardModelError)
        if not isinstance(getattr(model, "score", None), torch.nn.Linear):
            raise RewardModelError(f"update.reward_model {str(folder)!r} ({type(model).__name__}) has no linear "
                                   "`score` head; use a decoder-style *ForSequenceClassification model.")
        rows = model.get_input_embeddings().weight.shape[0]
        if rows != vocab_size:
            raise RewardModelError(f"update.reward_model {str(folder)!r} embeds {rows} token ids but the policy's "
                                   f"vocabulary has {vocab_size}: the reward model must use the policy's tokenizer.")
        model.requires_grad_(False)
        model.eval()
        return cls(model.to(device), embed)

    def soft_inputs(self, prompt_ids: torch.Tensor, tokens: list[SoftToken]) -> torch.Tensor:
        """[n, P + T, H]: the prompt's embeddings then each relaxed token's yᵀE_φ."""
        weight = self.embedding.weight
        n = tokens[0].weights.shape[0]
        prompt = self.embedding(prompt_ids.to(weight.device).unsqueeze(0).expand(n, -1))
        soft = torch.stack([soft_embedding(tok, weight, self.embed) for tok in tokens], dim=1)
        return torch.cat([prompt, soft.to(prompt.dtype)], dim=1)

    def _reward(self, embeds: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return self.score(hidden[:, -1]).squeeze(-1).double()

    def __call__(self, prompt_ids: torch.Tensor, tokens: list[SoftToken]) -> torch.Tensor:
        """r_φ for each row: [n] float64, differentiable through the tokens' weights. The backbone's activations
        are recomputed in backward (one checkpoint), so only the [n, P + T, H] input is kept."""
        embeds = self.soft_inputs(prompt_ids, tokens)
        if torch.is_grad_enabled() and embeds.requires_grad:
            return checkpoint(self._reward, embeds, use_reentrant=False)
        return self._reward(embeds)

    def hard(self, input_ids: torch.Tensor) -> torch.Tensor:
        """r_φ of token sequences [n, L] long (no padding): [n] float64 — what the model was trained on."""
        return self._reward(self.embedding(input_ids.to(self.embedding.weight.device)))
