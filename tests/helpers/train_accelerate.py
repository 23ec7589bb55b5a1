"""Train LoRA on the toy base for 2 steps with accelerate and save the state (as an accelerate user would).

    python tests/helpers/train_accelerate.py BASE OUT [--custom-groups]

OUT/adapter: model.save_pretrained before training (adapter_config.json: the adapter's structure);
OUT/state: Accelerator.save_state after 2 steps (model.safetensors, optimizer.bin, scheduler.bin).
The optimizer: peft's LoRA+ AdamW (lora_B at 4× the lr); with --custom-groups a hand-made grouping (A matrices,
then B matrices at 4×) that no library rule reproduces.
"""

import sys

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

LR = 1e-3
B_RATIO = 4.0


def loraplus(model):
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=B_RATIO, weight_decay=0.01)


def param_groups(model):
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if "lora_B" not in n], "lr": LR},
            {"params": [p for n, p in trainable if "lora_B" in n], "lr": LR * B_RATIO}]


def main(base_dir: str, out: str, custom: bool) -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                            init_lora_weights="gaussian", task_type="CAUSAL_LM"))
    model.save_pretrained(f"{out}/adapter")
    optimizer = torch.optim.AdamW(param_groups(model), weight_decay=0.01) if custom else loraplus(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 10)
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(2):
        ids = torch.randint(0, base.config.vocab_size, (4, 8))
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    accelerator.save_state(f"{out}/state")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--custom-groups" in sys.argv[3:])
