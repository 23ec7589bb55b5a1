"""Where the training state comes from: files of every supported trainer, or a running trainer's objects, become
one `TrainingState` (model with adapter, trainable parameters in optimizer order, AdamW with its state, tokenizer,
scheduler, the recorded recipe, provenance).

- `files`: `open_checkpoint` (format detection, cheap checks) and `load_training_state`;
- `training`: `TrainingState` and `TrainingState.from_objects`;
- one reader per format: `paths` (probe_dist's own layout), `hf_trainer` (HF Trainer / TRL checkpoint-N),
  `accelerate`, `deepspeed` (ZeRO 1-3), behind `source.CheckpointSource`;
- `model`, `optimizer`: loading weights and the AdamW state; `recipe`: the recorded training settings;
- `checks`, `restricted_pickle`, `param_names`: finiteness and file checks, reading pickled training arguments
  without running code, rebuilding the names of a bare optimizer state.

Validation of a state (files, tensors, AdamW values) is this package's job; it never reads the probe's config
beyond the checkpoint section's paths. Resolving the config against a state is `probe_dist.resolve`'s.
"""

from probe_dist.state.files import load_training_state, open_checkpoint
from probe_dist.state.training import TrainingState

__all__ = ["TrainingState", "load_training_state", "open_checkpoint"]
