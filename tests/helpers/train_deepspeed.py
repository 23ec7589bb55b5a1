"""Train LoRA on the toy checkpoint's base with DeepSpeed ZeRO (2 ranks, gloo, CPU) and save the state twice.

    torchrun --standalone --nproc_per_node=2 tests/helpers/train_deepspeed.py TOY STAGE OUT

OUT/ds:    engine.save_checkpoint (latest, global_step2/: model states, one optimizer shard per rank), plus
           adapter/ (adapter_config.json from save_pretrained before training: the adapter's structure) and
           training_args.json copied from TOY;
OUT/probe: the same trained state in probe_dist's layout (base/ and tokenizer/ copied from TOY, the adapter saved
           from the full fp32 master weights, optimizer.pt with names from DeepSpeed's safe_get_full_* API,
           training_args.json copied from TOY).
torch AdamW client optimizer with two param groups (lora_A at lr 1e-3, lora_B at 4e-3, different betas and eps).
"""

import os
import shutil
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

GROUPS = ({"match": "lora_A", "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
          {"match": "lora_B", "lr": 4e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.01})


def main(toy: str, stage: int, out: str) -> None:
    # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce (needs a C++ compiler, ~30 s) that gloo does
    # not need: the test machines may have no compiler.
    import deepspeed.comm.torch

    deepspeed.comm.torch.build_shm_op = lambda: None
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(f"{toy}/base", dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, init_lora_weights="gaussian", task_type="CAUSAL_LM"))
    if rank == 0:
        model.save_pretrained(f"{out}/ds/adapter")
        shutil.copy(f"{toy}/training_args.json", f"{out}/ds/training_args.json")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{**{k: v for k, v in g.items() if k != "match"}, "params": [p for n, p in named if g["match"] in n]}
              for g in GROUPS]
    optimizer = torch.optim.AdamW(groups)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10_000}
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(1000 + rank)
    for _ in range(2):
        ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=generator)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    if stage < 3:  # DeepSpeed 0.19: ZeRO-1/2 link later groups' optimizer fragments only after the first group's step
        ds_optimizer._hp_optimizer_states_linked = False
        ds_optimizer._lazy_init_hp_params_optimizer_state()
    full = {}
    for n, p in engine.module.named_parameters():  # collectives: every rank
        if p.requires_grad:
            full[n] = {"fp32": safe_get_full_fp32_param(p).detach().clone(),
                       "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").detach().clone(),
                       "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").detach().clone()}
    engine.save_checkpoint(f"{out}/ds")
    if rank == 0:
        write_probe_layout(toy, f"{out}/probe", model, full, named)
    dist.barrier()
    dist.destroy_process_group()


def write_probe_layout(toy: str, dest: str, model, full: dict, named) -> None:
    shutil.copytree(f"{toy}/base", f"{dest}/base")
    shutil.copytree(f"{toy}/tokenizer", f"{dest}/tokenizer")
    shutil.copy(f"{toy}/training_args.json", f"{dest}/training_args.json")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in full:
                p.data = full[n]["fp32"].reshape(p.shape).clone()  # ZeRO-3 leaves the module's tensor partitioned
    model.save_pretrained(dest)
    names, state, param_groups, pid = [], {}, [], 0
    for g in GROUPS:
        ids = []
        for n, _ in named:
            if g["match"] in n:
                state[pid] = {"step": torch.tensor(2.0), "exp_avg": full[n]["exp_avg"],
                              "exp_avg_sq": full[n]["exp_avg_sq"]}
                names.append(n)
                ids.append(pid)
                pid += 1
        param_groups.append({"lr": g["lr"], "betas": g["betas"], "eps": g["eps"], "weight_decay": g["weight_decay"],
                             "amsgrad": False, "maximize": False, "params": ids})
    torch.save({"optimizer_class": "AdamW", "param_names": names,
                "state_dict": {"state": state, "param_groups": param_groups}}, f"{dest}/optimizer.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo/DeepSpeed threads occasionally abort in C++ teardown after everything is written
