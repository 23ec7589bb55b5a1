"""Train the toy base with TRL's GRPOTrainer (LoRA, CPU) with or without the online probe, and save what training
produced, so a test can compare two runs bit for bit.

    python tests/helpers/train_trl_online.py BASE TOKENIZER OUT [--probe-every N] [--steps N] [--tensorboard]
        [--save-step K]                      # also save θ_K's adapter, optimizer state and gradient (offline check)
    accelerate launch --multi_gpu --num_processes 2 tests/helpers/train_trl_online.py ...   # two gloo ranks

OUT receives (rank 0): final_adapter.safetensors (the trainable parameters by name), final_optimizer.pt (the
optimizer's state_dict), log_history.json, and with --save-step K: step{K}/ (adapter_model.safetensors +
adapter_config.json, optimizer.pt in probe_dist's named layout, grad.safetensors: the clipped gradient the
optimizer stepped on, lr.json). With --probe-every, every rank writes probe_rank{r}.json (its logged numbers).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from tests.helpers.rewards import reward_length


class SaveStep(TrainerCallback):
    """At optimizer step K, before the step: the adapter, the AdamW state (named) and the clipped gradient."""

    def __init__(self, step: int, out: Path):
        self.step, self.out = step, out

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step + 1 != self.step or int(os.environ.get("RANK", "0")) != 0:
            return
        from probe_dist.state.model import trainable_parameters
        from probe_dist.state.optimizer import save_optimizer

        self.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(self.out))
        inner = getattr(optimizer, "optimizer", optimizer)
        trainable = trainable_parameters(model)
        save_optimizer(inner, trainable, self.out / "optimizer.pt")
        save_file({n: p.grad.detach().clone().contiguous() for n, p in trainable}, str(self.out / "grad.safetensors"))
        (self.out / "lr.json").write_text(json.dumps([g["lr"] for g in inner.param_groups]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("tokenizer")
    ap.add_argument("out")
    ap.add_argument("--probe-every", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tensorboard", action="store_true")
    ap.add_argument("--save-step", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(a.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    args = GRPOConfig(output_dir=str(out / "trainer"), use_cpu=True, report_to="tensorboard" if a.tensorboard else "none",
                      per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=4, max_steps=a.steps, save_strategy="no", logging_steps=1,
                      learning_rate=1e-3, weight_decay=0.01, beta=0.0, dataloader_num_workers=0, seed=0)
    dataset = Dataset.from_list([{"prompt": f"{x}+{y}="} for x in range(6) for y in range(6)])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=base, reward_funcs=reward_length, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora)
    if a.save_step:
        trainer.add_callback(SaveStep(a.save_step, out / f"step{a.save_step}"))
    if a.probe_every:
        from probe_dist.callback import EntropyProbeCallback

        trainer.add_callback(EntropyProbeCallback(every_n_steps=a.probe_every, eval_prompts="toy", B_E=6, G_E=4,
                                                  trainer=trainer))
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    probe_logs = [{k: v for k, v in e.items() if k.startswith("entropy_probe/") or k == "step"}
                  for e in trainer.state.log_history if any(k.startswith("entropy_probe/") for k in e)]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"probe_rank{rank}.json").write_text(json.dumps(probe_logs))
    if rank == 0:
        model = trainer.model
        save_file({n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(out / "final_adapter.safetensors"))
        torch.save(trainer.optimizer.state_dict(), str(out / "final_optimizer.pt"))
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Under accelerate launch, gloo's background threads occasionally abort a finished process in C++ teardown
    # ("terminate called without an active exception", seen in CI on the run *without* the probe) even after
    # destroy_process_group; everything is written and flushed, so the process ends here.
    os._exit(0)
