"""Memory benchmark: per-phase peaks as the batch grows, and (with a GPU) measured vs planned peaks.

    python bench/memory.py [--out bench/results/memory_cpu.json] [--toy-cache DIR] [--sizes 8,16,32,64]

CPU part (always): the real probe on the toy checkpoint (built once into --toy-cache) for B_U in --sizes at fixed
microbatch sizes, memory.profile on, each size in a fresh process (so absolute RSS peaks compare). Per phase it
records the peak bytes saved for backward (SavedTensorsMeter), the peak RSS and the RSS growth within the phase
(VmHWM reset at the phase start; allocations of 16 KiB and more pinned to mmap so freed memory leaves RSS
at once). With
--scale-e (the default) B_E grows with B_U, so the δH₁ pass (over E) is exercised at the same sizes.

GPU part (only when CUDA is available; --no-gpu skips it): builds a random-weight Qwen2.5-1.5B-shaped checkpoint
(LoRA r=64 on all projections, a synthetic AdamW state saved like probe_dist.state.optimizer.save_optimizer, a
character tokenizer widened to the model's vocabulary) in a temporary directory, caps this process at 40 GiB with
torch.cuda.set_per_process_memory_fraction, runs configs/a100_40gb_8gpu.yaml on one GPU with one GPU's share of
the batches (B_E = 512/8, B_U = 64/8; peaks do not depend on the number of groups, which the CPU part shows), and
records each phase's measured torch.cuda.max_memory_allocated against the planner's prediction for the microbatch
sizes the run ended up using. Target: planner error within 15%.

--smoke (CI: seconds, so the bench cannot rot): the same code path — the GRADE cases, then the CPU part with one
fresh process per size — on tiny shapes: a random-weight Qwen2 (vocabulary 256, hidden 32, 2 layers, LoRA r = 2)
built with build_random_checkpoint in a temporary directory instead of the toy (whose build takes a minute; pass
--checkpoint to use another one), one size B_U = B_E = 2 × G = 2 (the loop and the flatness ratios run, trivially
1; --sizes 2,4 for two), GRADE V = 256, hidden 32, T = 4, k ∈ {4, V}; explicit flags still win. The JSON has the
same schema; --out defaults to a temporary file and may not point into bench/results/. It exits 1 when any number
in the result is not finite or any run's status is not "completed". GPU: --smoke never runs the GPU part
(recorded as {"skipped": "--smoke"}); that part is unchanged — run it without --smoke.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from probe_dist.phases import DELTA_H1, PHASES, UPDATE_GRADIENT  # noqa: E402
from probe_dist.runtime.clock import PhaseClock  # noqa: E402
from probe_dist.runtime.meter import PhaseMemoryRecorder, merge_phase_records  # noqa: E402

GiB = 1 << 30
RESULTS = REPO / "bench" / "results"
# --smoke: tiny shapes for every size knob of the CPU and GRADE parts (explicit flags still win).
SMOKE_DEFAULTS = {"sizes": "2", "group": 2, "b_e": 2, "microbatch_score": 2, "microbatch_grad": 2,
                  "grade_vocab": 256, "grade_hidden": 32, "grade_rows": 2, "grade_steps": "4", "grade_top_k": "4,0"}


# ------------------------------------------------------------------------------------------- helpers
def pin_malloc() -> bool:
    """glibc: allocations ≥ 16 KiB always mmap'd (freed memory leaves RSS at once), trim at 128 KiB."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 16 * 1024)) and bool(libc.mallopt(-1, 128 * 1024))
    except (OSError, AttributeError):
        return False


class ProfilingClock(PhaseClock):
    """PhaseClock whose memory record per phase comes from PhaseMemoryRecorder (saved bytes, RSS, CUDA peaks)."""

    @contextlib.contextmanager
    def phase(self, name: str, label: str | None = None):  # label: the progress bar title (no bars here)
        gc.collect()
        start = time.perf_counter()
        with PhaseMemoryRecorder(self.device) as rec:
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.memory[name] = merge_phase_records(self.memory.get(name), rec.result)


def build_probe_profiled(cfg):
    from probe_dist.assemble import build_probe
    from probe_dist.runtime.dist import Runtime, init_runtime

    rt = init_runtime(cfg.device) if cfg.device != "cpu" else Runtime()
    probe = build_probe(cfg, rt)
    probe.clock = ProfilingClock(rank=rt.rank, profile=True, device=rt.device)
    return probe


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """Where a bench ran: library versions, the CPU (model, torch's ATen kernel ISA, cores), threads, UTC date —
    every committed result names the machine its figures were measured on."""
    import datetime

    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "cuda": torch.version.cuda, "machine": platform.machine(),
            "cpu": cpu_model(), "aten_isa": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}


def smoke_out_path(out: str | None, name: str) -> Path:
    """--smoke's JSON path: `out`, or a fresh temporary `<name>.json` when None.

    Raises SystemExit(2) when `out` lies inside bench/results/ (a smoke run never overwrites committed results)."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix=f"bench-smoke-{name}-")) / f"{name}.json"
    path = Path(out).resolve()
    if path.is_relative_to(RESULTS.resolve()):
        print(f"error: --smoke may not write into {RESULTS} (got --out {out})", file=sys.stderr)
        raise SystemExit(2)
    return path


def smoke_failures(result, where: str = "") -> list[str]:
    """What makes a --smoke result a failure: every number (int/float leaves of nested dicts/lists) must be finite
    and every "status" field must be "completed". Returns one line per problem, with its JSON path; [] when none."""
    import math

    if isinstance(result, dict):
        bad = []
        for key, value in result.items():
            if key == "status" and value != "completed":
                bad.append(f"{where}.{key} = {value!r} (not 'completed')")
            bad.extend(smoke_failures(value, f"{where}.{key}"))
        return bad
    if isinstance(result, (list, tuple)):
        return [line for i, v in enumerate(result) for line in smoke_failures(v, f"{where}[{i}]")]
    if isinstance(result, float) and not math.isfinite(result):
        return [f"{where} = {result} (not finite)"]
    return []


def check_smoke(result, out: Path, label: str) -> int:
    """--smoke's exit status for `result` (already written to `out`): 0, or 1 after printing smoke_failures."""
    bad = smoke_failures(result)
    for line in bad:
        print(f"[{label}] smoke failure: {line}", file=sys.stderr)
    print(f"[{label}] smoke {'FAILED' if bad else 'ok'}: {out}", file=sys.stderr)
    return 1 if bad else 0


def smoke_model_config():
    """--smoke's model: a random-weight Qwen2 with vocabulary 256 (≥ the toy characters), hidden 32, 2 layers."""
    import transformers

    return transformers.Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    tie_word_embeddings=True)


# ------------------------------------------------------------------------------------------- CPU part
def run_one_size(args) -> dict:
    """One B_U in this process: the whole probe with profiling; per-phase records."""
    from probe_dist.config import load_config

    pinned = pin_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    b_u = args.one
    b_e = b_u if args.scale_e else args.b_e
    overrides = [f"checkpoint.path={args.checkpoint}", "device=cpu", f"sampling.B_U={b_u}", f"sampling.B_E={b_e}",
                 f"sampling.G_U={args.group}", f"sampling.G_E={args.group}", "memory.profile=true",
                 f"memory.microbatch_score={args.microbatch_score}", f"memory.microbatch_grad={args.microbatch_grad}",
                 f"output.dir={tempfile.mkdtemp(prefix='bench-mem-')}", "log_level=warning"]
    cfg = load_config(None, overrides)
    probe = build_probe_profiled(cfg)
    start = time.perf_counter()
    summary = probe.run().summary()
    phases = {}
    for name in PHASES:
        rec = probe.clock.memory.get(name, {})
        phases[name] = {k: rec.get(k) for k in ("saved_peak_bytes", "rss_peak_bytes", "rss_growth_bytes",
                                                "rss_start_bytes", "rss_peak_scope")}
        phases[name]["seconds"] = probe.clock.seconds.get(name)
    return {"B_U": b_u, "B_E": b_e, "G": args.group, "microbatch_score": args.microbatch_score,
            "microbatch_grad": args.microbatch_grad, "malloc_pinned": pinned, "status": summary["status"],
            "entropy_base": summary.get("entropy/base"), "delta_h1_per_eta": summary.get("delta_h1/per_eta"),
            "seconds": time.perf_counter() - start, "phases": phases}


def cpu_part(args) -> dict:
    from probe_dist.toy.checkpoint import ensure_toy_checkpoint

    ckpt = Path(args.checkpoint) if args.checkpoint else ensure_toy_checkpoint(0, args.toy_cache)
    runs = []
    for size in args.sizes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(size), "--checkpoint", str(ckpt),
               "--group", str(args.group), "--microbatch-score", str(args.microbatch_score),
               "--microbatch-grad", str(args.microbatch_grad), "--b-e", str(args.b_e),
               "--threads", str(args.threads or 0)] + ([] if args.scale_e else ["--no-scale-e"])
        print(f"[bench/memory] CPU: B_U={size} ...", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if res.returncode != 0:
            raise RuntimeError(f"B_U={size} failed:\n{res.stderr[-4000:]}")
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    flat = {}
    for phase in (UPDATE_GRADIENT, DELTA_H1):
        saved = [r["phases"][phase]["saved_peak_bytes"] for r in runs]
        rss = [r["phases"][phase]["rss_peak_bytes"] for r in runs]
        growth = [r["phases"][phase]["rss_growth_bytes"] for r in runs]
        flat[phase] = {"saved_peak_max_over_min": max(saved) / max(min(saved), 1),
                       "rss_peak_max_over_min": max(rss) / max(min(rss), 1),
                       "rss_growth_max_over_min": max(growth) / max(min(growth), 1)}
    return {"checkpoint": str(ckpt), "sizes": args.sizes, "runs": runs, "flatness": flat}


# ------------------------------------------------------------------------------------------- GPU part
def wide_char_tokenizer(vocab_size: int):
    """The toy character tokenizer with ids 16..vocab_size-1 as dummy tokens '<xN>' (WordLevel, fast)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from probe_dist.toy.task import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, VOCAB

    vocab = dict(VOCAB)
    vocab.update({f"<x{i}>": i for i in range(len(VOCAB), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                                pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, padding_side="left",
                                                model_max_length=4096)


def build_random_checkpoint(out: Path, model_config, device: torch.device, lora_r: int = 64,
                            max_new_tokens: int = 128) -> Path:
    """Random-weight base + LoRA (B ≠ 0) + synthetic AdamW state, in the probe's checkpoint layout."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from probe_dist.plan import ALL_PROJECTIONS
    from probe_dist.state.model import trainable_parameters
    from probe_dist.state.optimizer import save_optimizer
    from probe_dist.toy.task import BOS_ID, EOS_ID, PAD_ID

    out.mkdir(parents=True, exist_ok=True)
    config = model_config
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(config).float().eval()
    model.save_pretrained(str(out / "base"))
    wide_char_tokenizer(config.vocab_size).save_pretrained(str(out / "tokenizer"))
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=2 * lora_r,
                                             lora_dropout=0.0, target_modules=list(ALL_PROJECTIONS)))
    trainable = trainable_parameters(model)
    with torch.no_grad():
        for name, p in trainable:
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)  # the adapter changes the policy, as a trained one does
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-5, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.01)
    gen = torch.Generator(device=device).manual_seed(1)
    for _, p in trainable:  # a plausible state after 10 steps, without running them
        optimizer.state[p] = {"step": torch.tensor(10.0),
                              "exp_avg": 1e-4 * torch.randn(p.shape, generator=gen, device=p.device),
                              "exp_avg_sq": 1e-8 * torch.rand(p.shape, generator=gen, device=p.device)}
    model.save_pretrained(str(out))
    save_optimizer(optimizer, trainable, out / "optimizer.pt")
    (out / "training_args.json").write_text(json.dumps({"loss": "grpo", "temperature": 1.0,
                                                        "max_new_tokens": max_new_tokens, "grad_clip": 1.0}))
    del model, optimizer, trainable
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def preset_part(args, device: torch.device) -> dict:
    """Run the preset on one device under a memory cap; measured vs planned per phase."""
    from probe_dist.config import load_config
    from probe_dist.data.prompts import load_prompts
    from probe_dist.plan import builtin_model_config, load_model_config, plan_memory

    workdir = Path(args.gpu_workdir or tempfile.mkdtemp(prefix="bench-mem-gpu-"))
    model_config = (builtin_model_config("qwen2.5-1.5b") if args.preset_model == "qwen2.5-1.5b"
                    else load_model_config(args.preset_model))
    t0 = time.perf_counter()
    ckpt = build_random_checkpoint(workdir / "ckpt", model_config, device, lora_r=args.lora_r)
    build_seconds = time.perf_counter() - t0
    cap = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        cap = min(args.gpu_mem, total)
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
        torch.cuda.reset_peak_memory_stats(device)
    overrides = [f"checkpoint.path={ckpt}", f"device={device.type}", f"sampling.B_E={args.gpu_groups_e}",
                 f"sampling.B_U={args.gpu_groups_u}", f"output.dir={workdir / 'run'}", "memory.profile=true",
                 "log_level=warning", *args.preset_overrides]
    cfg = load_config(args.preset, overrides)
    probe = build_probe_profiled(cfg)
    status, error = "completed", None
    t0 = time.perf_counter()
    try:
        result = probe.run()
        status = result.status
    except Exception as exc:  # noqa: BLE001 - an OOM or any failure is a result worth recording
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    run_seconds = time.perf_counter() - t0
    # Plan for the sizes the run really used (auto_microbatch may have halved them) and the real prompt length.
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(
        cfg.memory, microbatch_score=probe.runner.sizes.score, microbatch_grad=probe.runner.sizes.grad,
        logits_chunk=probe.policy.logits_chunk))
    prompts = load_prompts(cfg.sampling.prompts, cfg.sampling.split)
    prompt_tokens = 1 + max(len(probe.tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]) for p in prompts)
    plan = plan_memory(cfg, args.gpu_mem, ckpt / "base", world_size=1, prompt_tokens=prompt_tokens)
    phases = {}
    for name in PHASES:
        rec = probe.clock.memory.get(name, {})
        planned = plan["phases"][name]["peak_bytes"]
        measured = rec.get("cuda_peak_allocated_bytes")
        phases[name] = {"planned_bytes": planned, "measured_bytes": measured,
                        "measured_reserved_bytes": rec.get("cuda_peak_reserved_bytes"),
                        "saved_peak_bytes": rec.get("saved_peak_bytes"),
                        "error": (measured - planned) / planned if measured else None,
                        "components": plan["phases"][name]["components"], "seconds": probe.clock.seconds.get(name)}
    errors = [abs(p["error"]) for p in phases.values() if p["error"] is not None]
    batch_e = result.batch_e if status != "failed" else None
    widths = sorted({int(g.lengths.max()) for g in batch_e.groups}) if batch_e is not None else []
    out = {"preset": str(args.preset), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "memory_cap_bytes": cap, "status": status, "error": error, "B_E": cfg.sampling.B_E,
           "B_U": cfg.sampling.B_U, "microbatch_score": probe.runner.sizes.score,
           "microbatch_grad": probe.runner.sizes.grad,
           "logits_chunk": probe.policy.logits_chunk, "prompt_tokens": prompt_tokens, "response_widths_E": widths,
           "build_seconds": build_seconds, "run_seconds": run_seconds, "phases": phases,
           "max_abs_planner_error": max(errors) if errors else None,
           "planner_within_15pct": (max(errors) <= 0.15) if errors else None,
           "plan_message": plan["message"]}
    if not args.keep_workdir and not args.gpu_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------- GRADE part
def grade_case(*, vocab: int, hidden: int, layers: int, rows: int, prompt_len: int, steps: int, top_k: int,
               efficient: bool) -> dict:
    """Peak bytes saved for backward (SavedTensorsMeter) over one GRADE microbatch: relaxed rollout of `rows` rows,
    reward, β·KL, backward. efficient: the probe's path (KV cache with gradient, per-step checkpointing, sparse
    top-k tokens, checkpointed reward model); else the dense formulation — the same math with full-vocabulary soft
    tokens, no checkpointing (every step's activations, policy and reference logits [rows, V] kept for backward)
    and the dense [rows, V]·E reward input."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from probe_dist.model.policy import PolicyModel
    from probe_dist.model.reward_model import RewardModel
    from probe_dist.runtime.meter import SavedTensorsMeter
    from probe_dist.update.grade import GradeSpec, SoftRolloutRunner, row_keys
    from probe_dist.update.loss import grade_loss_per_sequence

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=prompt_len + steps + 8,
                      tie_word_embeddings=True)
    model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"]))
    model.eval()
    rm_cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=prompt_len + steps + 8,
                         num_labels=1, pad_token_id=0)
    rm = RewardModel(Qwen2ForSequenceClassification(rm_cfg).eval().requires_grad_(False),
                     "auto" if efficient else "dense")
    spec = GradeSpec(steps=steps, temperature=1.0, tau_g=1.0, top_k=top_k if efficient else 0,
                     straight_through=False, kl_coef=0.05)
    run = SoftRolloutRunner(PolicyModel(model), model.disable_adapter, spec)
    prompt = torch.arange(1, prompt_len + 1) % vocab
    keys = row_keys(0, "U", 0, range(rows))
    start = time.perf_counter()
    with SavedTensorsMeter() as meter:
        roll = run.rollout(prompt, keys, checkpoint_steps=efficient)
        reward = rm(prompt, roll.tokens) if efficient else rm._reward(rm.soft_inputs(prompt, roll.tokens))
        loss = grade_loss_per_sequence(reward, roll.kl, kl_coef=spec.kl_coef, num_rows=rows).sum()
        loss.backward()
    return {"efficient": efficient, "vocab": vocab, "hidden": hidden, "layers": layers, "rows": rows,
            "prompt_len": prompt_len, "steps": steps, "top_k": spec.top_k or vocab,
            "peak_saved_bytes": meter.peak_bytes, "seconds": round(time.perf_counter() - start, 3)}


def grade_part(args) -> dict:
    """GRADE's peak saved bytes vs k and T against the dense formulation (one process, CPU)."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(vocab=args.grade_vocab, hidden=args.grade_hidden, layers=2, rows=args.grade_rows, prompt_len=16)
    cases = []
    try:
        for steps in args.grade_steps:
            cases.append(grade_case(**shape, steps=steps, top_k=0, efficient=False))
            for k in args.grade_top_k:
                cases.append(grade_case(**shape, steps=steps, top_k=k, efficient=True))
    finally:
        torch.set_num_threads(threads)
    dense = {c["steps"]: c["peak_saved_bytes"] for c in cases if not c["efficient"]}
    for c in cases:
        c["vs_dense"] = round(c["peak_saved_bytes"] / dense[c["steps"]], 4)
    return {"shape": shape, "cases": cases,
            "note": "peak bytes saved for backward over one microbatch (forward + backward); dense = no "
                    "checkpointing, full-vocabulary soft tokens, dense reward input, same KV cache"}


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON output path (default bench/results/memory_cpu.json; with "
                                               "--grade-only memory_grade_cpu.json; with --smoke a temporary file)")
    p.add_argument("--smoke", action="store_true", help="CI: the same bench on tiny shapes in seconds (see above)")
    p.add_argument("--toy-cache", default=None, help="where the toy checkpoint is built/cached")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint instead of the toy one")
    p.add_argument("--sizes", default="8,16,32,64", help="B_U values")
    p.add_argument("--group", type=int, default=4, help="G_U = G_E")
    p.add_argument("--b-e", type=int, default=8, help="B_E when --no-scale-e")
    p.add_argument("--no-scale-e", dest="scale_e", action="store_false", help="keep B_E fixed at --b-e")
    p.add_argument("--microbatch-score", type=int, default=4)
    p.add_argument("--microbatch-grad", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the CPU runs (0: torch default)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU part even when CUDA is available")
    p.add_argument("--preset", default=str(REPO / "configs" / "a100_40gb_8gpu.yaml"))
    p.add_argument("--preset-model", default="qwen2.5-1.5b", help="model config for the random checkpoint")
    p.add_argument("--preset-overrides", nargs="*", default=[], help="extra key=value for the preset run")
    p.add_argument("--preset-on-cpu", action="store_true", help="smoke-test the GPU part's code path on CPU")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--gpu-mem", default="40GiB", help="per-process memory cap for the preset run")
    p.add_argument("--gpu-groups-e", type=int, default=64, help="B_E on the one GPU (512/8: one GPU's share)")
    p.add_argument("--gpu-groups-u", type=int, default=8, help="B_U on the one GPU (64/8)")
    p.add_argument("--gpu-workdir", default=None, help="where the random checkpoint goes (default: a temp dir)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--skip-cpu", action="store_true", help="only the GPU part")
    p.add_argument("--grade-only", action="store_true", help="only the GRADE cases (default --out: "
                                                                "bench/results/memory_grade_cpu.json)")
    p.add_argument("--skip-grade", action="store_true", help="skip the GRADE cases")
    p.add_argument("--grade-vocab", type=int, default=32768, help="GRADE cases: vocabulary size")
    p.add_argument("--grade-hidden", type=int, default=256, help="GRADE cases: hidden size")
    p.add_argument("--grade-rows", type=int, default=4, help="GRADE cases: rows per microbatch")
    p.add_argument("--grade-steps", default="16,32,64", help="GRADE cases: relaxed tokens T")
    p.add_argument("--grade-top-k", default="16,256,0", help="GRADE cases: top-k (0: the whole vocabulary)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(**SMOKE_DEFAULTS)
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    args.grade_steps = [int(s) for s in str(args.grade_steps).split(",") if s]
    args.grade_top_k = [int(s) for s in str(args.grade_top_k).split(",") if s]
    if args.smoke:
        args.out = smoke_out_path(args.out, "memory")
    elif args.out is None:
        args.out = str(RESULTS / ("memory_grade_cpu.json" if args.grade_only else "memory_cpu.json"))
    from probe_dist.plan import parse_bytes

    args.gpu_mem = parse_bytes(args.gpu_mem)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one_size(args)))
        return 0
    result = {"benchmark": "memory", "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not args.skip_grade:
        result["grade"] = grade_part(args)
        print("GRADE peak bytes saved for backward (one microbatch):\n   T      k   MiB     vs dense", file=sys.stderr)
        for c in result["grade"]["cases"]:
            label = "dense" if not c["efficient"] else str(c["top_k"])
            print(f"{c['steps']:4d} {label:>6} {c['peak_saved_bytes'] / 2**20:8.2f} {c['vs_dense']:8.4f}",
                  file=sys.stderr)
    if args.grade_only:
        args.skip_cpu, args.no_gpu = True, True
    smoke_dir = None
    if args.smoke and not args.skip_cpu and not args.checkpoint:
        smoke_dir = Path(tempfile.mkdtemp(prefix="bench-smoke-memory-ckpt-"))
        args.checkpoint = str(build_random_checkpoint(smoke_dir / "ckpt", smoke_model_config(), torch.device("cpu"),
                                                      lora_r=2, max_new_tokens=8))
    try:
        if not args.skip_cpu:
            result["cpu"] = cpu_part(args)
    finally:
        if smoke_dir is not None:
            shutil.rmtree(smoke_dir, ignore_errors=True)
    if args.preset_on_cpu:
        result["preset_cpu_smoke"] = preset_part(args, torch.device("cpu"))
    elif torch.cuda.is_available() and not args.no_gpu and not args.smoke:  # --smoke never runs the GPU part
        print("[bench/memory] GPU: building the random checkpoint and running the preset ...", file=sys.stderr)
        result["gpu"] = preset_part(args, torch.device("cuda", 0))
    elif not args.grade_only:
        result["gpu"] = {"skipped": "--smoke" if args.smoke else
                         "no CUDA device" if not torch.cuda.is_available() else "--no-gpu"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"[bench/memory] wrote {out}", file=sys.stderr)
    return check_smoke(result, out, "bench/memory") if args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
