"""Train the toy base with TRL's GRPOTrainer for 3 steps on CPU and keep checkpoint-2 (as a TRL user would).

    python tests/helpers/train_trl.py BASE TOKENIZER OUT [--loraplus | --full]

LoRA on every linear projection (TRL's peft_config path), TRL's defaults otherwise; --loraplus builds the optimizer
with peft's create_loraplus_optimizer (lora_B at 16× the lr) and hands it to the trainer, as LoRA+ users do;
--full fine-tunes the whole model (HF Trainer's decay group: matrices; no-decay group: norms and biases; β = 0,
since the probe refuses a KL term without an adapter to disable).
With a peft model given, TRL keeps its starting adapter as the KL reference (ref/), so the LoRA+ run uses β = 0.
save_steps=2 of max_steps=3 leaves a checkpoint whose linear schedule has not ended (lr > 0).
"""

import sys

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from tests.helpers.rewards import reward_length

LR = 1e-3
LORAPLUS_RATIO = 16.0


def main(base_dir: str, tokenizer_dir: str, out: str, loraplus: bool, full: bool) -> None:
    torch.manual_seed(0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=out, use_cpu=True, report_to="none", per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=4, max_steps=3, save_steps=2, logging_steps=1,
                      learning_rate=LR, weight_decay=0.01, beta=0.0 if loraplus or full else 0.02,
                      dataloader_num_workers=0, seed=0)
    dataset = Dataset.from_list([{"prompt": f"{a}+{b}="} for a in range(6) for b in range(6)])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    if full:
        trainer = GRPOTrainer(model=base, reward_funcs=reward_length, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    elif loraplus:
        model = get_peft_model(base, lora)
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=LORAPLUS_RATIO,
                                              weight_decay=0.01)
        trainer = GRPOTrainer(model=model, reward_funcs=reward_length, args=args, train_dataset=dataset,
                              processing_class=tokenizer, optimizers=(optimizer, None))
    else:
        trainer = GRPOTrainer(model=base, reward_funcs=reward_length, args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora)
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--loraplus" in sys.argv[4:], "--full" in sys.argv[4:])
