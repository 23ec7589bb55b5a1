"""The typed configuration schema: every knob of the method (docs/method.md), with its default and allowed values.

Each field carries `metadata` used by the loader (`probe_dist.config`) for validation:
  choices=(...)      allowed values
  ge= / gt= / le=    numeric range
  help="..."         one line shown in error messages and `--help-config`
Fields whose default is None are resolved later from the checkpoint's recorded training settings
(temperature, max_new_tokens, loss family, grad clip) by `probe_dist.resolve.resolve`, which returns the
final config once; every section is frozen, so nothing changes it while a run is going.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _f(default, **meta):
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class CheckpointConfig:
    """Section `checkpoint`: where the model, adapter, optimizer state and tokenizer come from, and in which
    format (docs/method.md §1); with no path and no base, the built-in toy checkpoint for `toy_seed`."""

    path: str | None = _f(None, help="checkpoint directory: probe_dist's layout, an HF Trainer/TRL checkpoint-N, an "
                                     "accelerate save_state folder or a DeepSpeed ZeRO checkpoint")
    format: str = _f("auto", choices=("auto", "probe_dist", "hf_trainer", "accelerate", "deepspeed"),
                     help="checkpoint format (auto: detected from the files in checkpoint.path)")
    base: str | None = _f(None, help="explicit base-model directory (HF format); overrides path/base")
    adapter: str | None = _f(None, help="explicit LoRA adapter directory (adapter_config.json + weights)")
    optimizer: str | None = _f(None, help="explicit optimizer state file (probe_dist's optimizer.pt with names, or "
                                          "a bare AdamW state_dict whose names are rebuilt from the model)")
    tokenizer: str | None = _f(None, help="explicit tokenizer directory (default: <path>/tokenizer or base)")
    toy_seed: int = _f(0, ge=0, help="seed of the built-in toy checkpoint used when no checkpoint is given")
    toy_cache: str | None = _f(None, help="where the toy checkpoint is cached (default ~/.cache/probe_dist)")
    read_limits: str | None = _f(None, help="raise (or lower) the bounds on reading checkpoint files, e.g. "
                                            "'trainer_state_mib=256,depth=128' (names and defaults: README, "
                                            "'Reading limits')")


@dataclass(frozen=True)
class SamplingConfig:
    """Section `sampling`: the sizes of E and U (B_E, G_E, B_U, G_U), τ, the response length cap, the prompts
    and the reward (docs/method.md §2). Full support only: top_p = 1 and top_k = 0 (§1)."""

    B_E: int = _f(8, ge=1, help="prompts in the evaluation batch E")
    G_E: int = _f(4, ge=1, help="responses per prompt in E")
    B_U: int = _f(8, ge=2, help="prompts in the update batch U")
    G_U: int = _f(4, ge=2, help="responses per prompt in U")
    temperature: float | None = _f(None, gt=0.0, help="sampling temperature τ (default: checkpoint's)")
    max_new_tokens: int | None = _f(None, ge=1, help="response length cap (default: checkpoint's)")
    top_p: float = _f(1.0, gt=0.0, le=1.0, help="must stay 1.0: truncated support breaks importance weights")
    top_k: int = _f(0, ge=0, help="must stay 0: truncated support breaks importance weights")
    seed: int = _f(1234, ge=0, help="run seed; each prompt's responses use (seed, batch, prompt index)")
    prompts: str = _f("toy", help="'toy' (the built-in task) or a JSONL file of {prompt, answer}")
    split: str = _f("train", help="split of the built-in toy task (train, test) or of a DatasetDict")
    reward: str = _f("exact_match", help="reward: exact_match, math_verify, or package.module:function (TRL's "
                                         "convention; several comma-separated, each optionally *weight)")
    bos: str | None = _f(None, choices=("auto", "always", "never"),
                         help="BOS before a text prompt: the tokenizer's own rule (auto, as TRL), always, or never "
                              "(default: the checkpoint's recorded prompt_bos, else auto; always for the toy)")


@dataclass(frozen=True)
class RolloutConfig:
    """Section `rollout`: which engine draws E and U. `hf`, the probe's own decoding loop on the policy itself
    (exactly π_θ); `vllm`, a vLLM engine, whose sampler q differs from π_θ by kernels and precision — the
    estimates on E are then weighted by π_θ(y)/q(y) (docs/method.md §13)."""

    backend: str = _f("hf", choices=("hf", "vllm"), help="rollout engine: the probe's own sampler (hf) or vLLM")
    is_cap: float | None = _f(None, gt=0.0, help="truncate the sampler ratios π_θ(y)/q(y) at this value (TIS; "
                                                 "null: untruncated, unbiased up to self-normalisation)")
    vllm_gpu_memory_utilization: float = _f(0.3, gt=0.0, le=1.0, help="vllm: share of the device's memory the "
                                            "engine reserves, KV cache included (vLLM's CPU backend: of RAM)")
    vllm_max_num_seqs: int = _f(256, ge=1, help="vllm: sequences the engine decodes at once")


@dataclass(frozen=True)
class UpdateConfig:
    """Section `update`: how θ' is reached and the training loss L_U whose AdamW step is measured (TRL
    GRPOTrainer's loss options, or GRADE's pathwise objective; docs/method.md §4)."""

    route: str = _f("update_vector", choices=("update_vector", "real_step"),
                    help="how θ' is reached: exact AdamW update vector θ+ηu, or a real optimizer.step()")
    loss: str | None = _f(None, choices=("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "grade", "grade_st"),
                          help="loss aggregation (TRL's loss_type; default: checkpoint's), or GRADE's pathwise "
                               "objective through a Gumbel-softmax rollout (grade; grade_st: straight-through)")
    scale_rewards: str | None = _f(None, choices=("group", "batch", "none"),
                                   help="advantage std: per group, over the batch, or none (default: none for "
                                        "dr_grpo, group otherwise; TRL's default is group for every loss)")
    kl_coef: float = _f(0.0, ge=0.0, help="β: coefficient of the KL-to-reference (adapter disabled) term")
    kl_bias_correction: bool = _f(False, help="multiply the k3 KL term by the importance ratio, as TRL's "
                                              "use_bias_correction_kl (TRL's default: true)")
    epsilon_high: float = _f(0.2, gt=0.0, help="cispo: the ratio clamp ε_high (TRL's epsilon_high, default ε = 0.2)")
    mask_truncated: bool = _f(False, help="drop responses that did not end with an EOS from the loss (TRL's "
                                          "mask_truncated_completions)")
    top_entropy_quantile: float = _f(1.0, ge=0.0, le=1.0, help="policy term only on tokens whose entropy is in "
                                                                "this top fraction of the block's (TRL's)")
    entropy_coef: float = _f(0.0, help="entropy bonus: loss − coef·(token-mean entropy per block) (TRL's)")
    loss_block_rows: int | None = _f(None, ge=1, help="sequences per training micro-step (TRL's per_device_"
                                                      "train_batch_size): bnpo's token mean and the entropy "
                                                      "quantile are per block (default: all of U)")
    autocast: str = _f("none", choices=("none", "bfloat16"), help="run the gradient pass under bf16 autocast, "
                                                                  "as TRL's bf16=True training (scoring stays fp32)")
    ignore_unsupported_recipe: bool = _f(False, help="probe anyway when the checkpoint records training the probe "
                                                     "cannot reproduce (num_iterations > 1, stale or vLLM-corrected "
                                                     "samples); the step measured is the on-policy one")
    grad_clip: float | None = _f(None, ge=0.0, help="max grad norm as in training; 0 disables (default: checkpoint's)")
    adv_eps: float = _f(1e-6, gt=0.0, help="ε in GRPO advantages (r − mean)/(std + ε) (verl 1e-6; TRL 1e-4)")
    max_len: int | None = _f(None, ge=1, help="L_max for dr_grpo normalisation (default: max_new_tokens)")
    reward_model: str | None = _f(None, help="GRADE: reward model folder (a one-label *ForSequenceClassification "
                                             "over the policy's vocabulary; default: <checkpoint.path>/reward_model)")
    grade_tau: float = _f(1.0, gt=0.0, help="GRADE: Gumbel-softmax temperature τ_g of the relaxed tokens")
    grade_top_k: int = _f(256, ge=0, help="GRADE: relax over the top-k tokens of each step (0: the whole "
                                          "vocabulary, exact)")
    grade_embed: str = _f("auto", choices=("auto", "sparse", "dense"),
                          help="GRADE: soft tokens to embeddings by an embedding_bag over the k ids (sparse), a "
                               "[rows, V] matmul (dense), or whichever is smaller (auto)")


@dataclass(frozen=True)
class EstimatorsConfig:
    """Section `estimators`: the entropy estimator Ĥ (normalisation, payload), the δH₁ estimator, the η sweep,
    two-batch or single-batch mode, and which SE is reported (docs/method.md §3, §5, §6, §9, §10)."""

    normalize: str = _f("per_token", choices=("per_token", "per_sequence"), help="entropy normalisation")
    payload: str = _f("rb", choices=("rb", "naive"), help="entropy payload: Rao–Blackwellised or −log π")
    delta_h1: str = _f("snis_derivative", choices=("snis_derivative", "causal_rb"), help="δH₁ estimator")
    etas: list[float] = _f([0.0, 1e-6, 1e-5, 1e-4], help="learning rates η of the sweep (η = 0 allowed)")
    eta_train: bool = _f(True, help="add the lr the saved scheduler gives the next training step (first param "
                                    "group's) to the sweep, marked eta_train in the summary")
    mode: str = _f("two_batch", choices=("two_batch", "single_batch"), help="E and U independent, or E = U")
    ustat: str = _f("exact", choices=("exact", "blocks"), help="single-batch U-statistic units")
    ustat_blocks: int = _f(4, ge=2, help="number of blocks M in ustat=blocks")
    log_weight_clip: float | None = _f(None, gt=0.0, help="clip log-weights above this (off by default)")
    se: str = _f("population", choices=("population", "fixed_prompts"),
                 help="which SE the *_se keys report: prompts drawn from a population, or conditional on E's prompts")
    explain: bool = _f(True, help="per-sequence decompositions, curvature δH₂ and the Cui proxy (forward-mode passes)")


@dataclass(frozen=True)
class MemoryConfig:
    """Section `memory`: rows per generation/scoring/gradient pass, the logits chunk, where param-sized
    accumulators live, the trainable-parameter guard, and the planner / OOM-halving switches."""

    microbatch_generate: int = _f(64, ge=1, help="rows decoded together: whole prompt groups per block (at least "
                                                  "one; bounds the KV cache; auto_microbatch halves it to fit)")
    microbatch_score: int = _f(8, ge=1, help="sequences per no-grad scoring forward")
    microbatch_grad: int = _f(4, ge=1, help="sequences per forward+backward")
    microbatch_jvp: int = _f(8, ge=1, help="sequences per forward-mode pass (δH₁, the explanation's directional "
                                          "derivatives; no graph is kept)")
    logits_chunk: int = _f(1024, ge=1, help="response positions per logits/entropy chunk")
    accumulator_device: str = _f("cpu", choices=("cpu", "model"), help="where param-sized accumulators live")
    max_trainable_params: int = _f(50_000_000, ge=1, help="refuse more trainable parameters than this")
    allow_full_finetune: bool = _f(False, help="allow trainable parameter count above max_trainable_params")
    profile: bool = _f(False, help="record per-phase current/peak memory in the summary")
    auto_microbatch: bool = _f(False, help="plan microbatch sizes and halve them on OOM")
    gpu_mem_gib: float | None = _f(None, gt=0.0, help="memory budget per GPU for the planner (default: device's)")


@dataclass(frozen=True)
class PrecisionConfig:
    """Section `precision`: the dtype of the probe's forwards and torch's float32 matmul precision
    (docs/method.md §8)."""

    dtype: str = _f("float32", choices=("float32", "bfloat16", "float64"), help="dtype of the probe's forwards")
    matmul: str = _f("highest", choices=("highest", "high", "medium"), help="torch float32 matmul precision")


@dataclass(frozen=True)
class DistributedConfig:
    """Section `distributed`: how the policy is wrapped across ranks (runtime/strategy.py), the process-group
    backend and the collective timeout in seconds."""

    strategy: str = _f("none", choices=("none", "ddp", "fsdp2"), help="how the model is wrapped across ranks")
    backend: str = _f("auto", choices=("auto", "nccl", "gloo"), help="process-group backend")
    timeout_s: float = _f(600.0, gt=0.0, help="collective timeout; a failing rank ends all ranks within it")


@dataclass(frozen=True)
class OutputConfig:
    """Section `output`: the output directory (published whole by rank 0, report/publish.py) and which files
    are written (docs/outputs.md)."""

    dir: str = _f("runs/probe", help="output directory (rank 0 writes)")
    save_update_vector: bool = _f(False, help="write update_vector.safetensors keyed by adapter names")
    table_format: str = _f("jsonl", choices=("jsonl", "parquet"), help="per-sequence table format")
    plots: bool = _f(True, help="write delta_h.png and report.html")
    overwrite: bool = _f(True, help="replace the results of an earlier run in output.dir (false: refuse)")
    progress: bool | None = _f(None, help="a progress bar per phase on rank 0 (null: only when stderr is a terminal)")
    report_to: str = _f("none", choices=("none", "tensorboard", "wandb", "tensorboard,wandb", "wandb,tensorboard"),
                        help="experiment trackers that get the summary's numbers and the sweep over η "
                             "(output.dir/tensorboard, wandb's project from WANDB_PROJECT)")


@dataclass(frozen=True)
class DebugConfig:
    """Section `debug`: fault and signal injection for the failure and stop-path tests, and autograd anomaly
    detection."""

    fault: str | None = _f(None, help="fault injection for failure tests: '<rank>:<phase>' raises in that phase "
                                      "on that rank (phases: sample, score_base, update_gradient, delta_h1, explain, sweep)")
    signal: str | None = _f(None, help="stop-path tests: '<rank>:<phase>:<SIGTERM|SIGINT|SIGUSR1>' sends that "
                                       "signal to this process as the phase starts (phases: load and the above)")
    detect_anomaly: bool = _f(False, help="torch.autograd anomaly detection (slow; for debugging NaN gradients)")


@dataclass(frozen=True)
class ProbeConfig:
    """The whole probe configuration: one frozen dataclass per section plus the top-level `device` and
    `log_level`. Built and validated by `probe_dist.config.load_config` (ConfigError on a bad value)."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    estimators: EstimatorsConfig = field(default_factory=EstimatorsConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"), help="compute device")
    log_level: str = _f("info", choices=("debug", "info", "warning"), help="logging verbosity")
