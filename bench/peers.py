"""In-process peers for ``twinserve bench``: HF transformers (+ PEFT mixed adapters) and a matmul roofline.

On the same artifact, prompts, max_tokens, device, dtype and thread count as the engine runs:

- ``hf_generate``: transformers' own causal-LM class with θ* loaded, ``generate`` (greedy) on static
  batches of ``batch_size`` left-padded prompts — the backbone's reference speed.
- ``peft_mixed``: the same model wrapped by PEFT with one LoRA adapter per expert, built from the
  artifact's exclusive factors (lora_A = A_t, lora_B = B_t, lora_alpha = r so the scaling is 1; the
  embedding's LoRA stores the same product transposed), generating the mix with PEFT's per-row
  ``adapter_names`` (each request uses its task's expert). This is how multi-LoRA batches are served
  with transformers + PEFT (peft/tuners/lora/layer.py ``_mixed_batch_forward``).
- ``roofline``: ``torch.mm`` (and, on CPU, oneDNN's prepacked linear) over every nn.Linear weight of θ*
  in model order at M = batch rows (the matmuls of one decode step and nothing else), and the backbone
  decode step measured on the served model; the ratio is the step's fraction of the matmul roofline.
  On CUDA every timed region ends with ``torch.cuda.synchronize`` (kernels launch asynchronously).

- ``vllm_base`` / ``vllm_lora`` (out of process): θ* and the same adapters exported as checkpoints
  (``export_vllm_model``) and served by vLLM under its own Python (``bench/vllm_peer.py``, ``run_vllm_job``).

Static batching is how ``generate`` serves a queue: the closed loop of ``batch_size`` clients becomes
consecutive batches of ``batch_size`` requests, each request arriving when its batch starts.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from twin.artifact import BACKBONE, EXCLUSIVE, load_tensors, read_manifest, stored_factors
from twin.errors import TwinserveError
from twin.loading import config_from_manifest

PEER_MODES = ("hf_generate", "peft_mixed")


class PeerError(TwinserveError):
    """The artifact cannot be expressed as a transformers/PEFT peer (named tensor and reason)."""


# ---- models -----------------------------------------------------------------------------------------
def hf_backbone(path: str | Path, dtype: str = "float32", device: str = "cpu") -> nn.Module:
    """transformers' causal-LM class for the artifact's config with θ* loaded (on ``device``, ``dtype``, eval)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    manifest = read_manifest(path)
    model = AutoModelForCausalLM.from_config(config_from_manifest(manifest), dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(load_tensors(path, BACKBONE), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        bad = sorted(set(missing) - tied) or sorted(unexpected)
        raise PeerError(f"{path / BACKBONE}: tensor {bad[0]} does not match {type(model).__name__}")
    return model.to(device).eval()


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


def peft_mixed_model(model: nn.Module, path: str | Path) -> nn.Module:
    """Wrap ``model`` (θ*, from ``hf_backbone``) in place: one PEFT LoRA adapter per expert, named as the expert.

    Per 2-D tensor W (d_out × d_in) with δ_t ≈ B_t A_t: a Linear gets lora_A = A_t (r × d_in), lora_B = B_t
    (d_out × r); an Embedding (PEFT computes E[x] Bᵀ... as (lora_embedding_B lora_embedding_A)ᵀ) gets
    lora_embedding_A = B_tᵀ (r × vocab), lora_embedding_B = A_tᵀ (d × r). lora_alpha = r (scaling 1);
    per-tensor ranks that differ from the expert's most common rank go to rank_pattern / alpha_pattern.
    Raises PeerError, naming the tensor, for what a PEFT mixed-adapter batch cannot hold: tied embeddings
    with deltas, and dense 1-D deltas (norm gains, biases): PEFT's per-adapter module copies
    (modules_to_save) refuse mixed batches for anything but Linear/Embedding/Conv modules.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PeerError("peft is not installed (it is in twinserve's dev extras): pip install 'peft>=0.11'") from None

    path = Path(path)
    manifest = read_manifest(path)
    tensors = load_tensors(path, EXCLUSIVE)
    names = manifest.expert_names
    lowrank = [p for p, i in manifest.tensors.items() if i.kind == "lowrank"]
    dense = [p for p, i in manifest.tensors.items() if i.kind != "lowrank"]
    targets = sorted({_module_of(p) for p in lowrank})
    if model.config.tie_word_embeddings and lowrank:
        raise PeerError("tied input/output embeddings: the PEFT peer supports untied models only")
    if dense:
        raise PeerError(f"{dense[0]}: dense per-expert deltas cannot be served in a PEFT mixed-adapter batch "
                        f"(modules_to_save supports mixed batches of Linear/Embedding/Conv only)")

    peft_model = None
    for t, name in enumerate(names):
        ranks = {_module_of(p): stored_factors(tensors, p, name)[1].shape[0] for p in lowrank}
        r = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
        other = {m: k for m, k in ranks.items() if k != r}
        cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets,
                         rank_pattern=other, alpha_pattern=dict(other), bias="none")
        if peft_model is None:
            with warnings.catch_warnings():   # peft asks transformers a deprecated question (is_gradient_checkpointing)
                warnings.simplefilter("ignore", FutureWarning)
                peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    assert peft_model is not None
    base = peft_model.base_model.model
    with torch.no_grad():
        for p in lowrank:
            layer = base.get_submodule(_module_of(p))
            for name in names:
                B, A = stored_factors(tensors, p, name)          # (d_out, r), (r, d_in)
                if name in getattr(layer, "lora_embedding_A", {}):
                    layer.lora_embedding_A[name].copy_(B.T)
                    layer.lora_embedding_B[name].copy_(A.T)
                else:
                    layer.lora_A[name].weight.copy_(A)
                    layer.lora_B[name].weight.copy_(B)
    return peft_model.eval()


def linear_shapes(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of every nn.Linear of a plain transformers model, in module order (lm_head last)."""
    return [(n, m.out_features, m.in_features) for n, m in model.named_modules() if type(m) is nn.Linear]


# ---- generation -------------------------------------------------------------------------------------
class _FirstToken:
    """A no-op logits processor that records when the first token's logits arrive (TTFT)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], max_tokens: int, pad_id: int,
                   adapter_names: list[str] | None = None) -> tuple[list[list[int]], float | None]:
    """Greedy ``generate`` of exactly ``max_tokens`` tokens per prompt (left-padded; eos does not stop).

    Returns the generated ids per prompt and the time the first token's logits were ready.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    n = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (n - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    first = _FirstToken()
    # no eos at all (not a suppressed one): every row runs to max_new_tokens, as ignore_eos does in the engine
    model.generation_config.eos_token_id = None
    gc_ = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=None, pad_token_id=pad_id,
                           num_beams=1)
    kw = {} if adapter_names is None else {"adapter_names": adapter_names}
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc_,
                         logits_processor=LogitsProcessorList([first]), **kw)
    return [row[n:].tolist() for row in out], first.at


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages (the KV cache of ``generate`` is transient)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def timed_generate(model, prompts: list[list[int]], batch_size: int, max_tokens: int, pad_id: int,
                   adapters: list[str] | None = None) -> tuple[float, list[tuple[float, float | None, float]],
                                                               list[list[int]]]:
    """One pass over ``prompts`` in consecutive batches: (wall s, per request (arrival, first token, done), ids)."""
    times: list[tuple[float, float | None, float]] = []
    outs: list[list[int]] = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        start = time.perf_counter()
        chunk = prompts[i:i + batch_size]
        got, first = generate_batch(model, chunk, max_tokens, pad_id,
                                    None if adapters is None else adapters[i:i + batch_size])
        end = time.perf_counter()
        outs.extend(got)
        times.extend((start, first, end) for _ in chunk)
    return time.perf_counter() - t0, times, outs


# ---- roofline ---------------------------------------------------------------------------------------
def sync(device: torch.device | str) -> None:
    """Wait for the device's queued kernels (CUDA launches are asynchronous; a timer must not stop early)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _onednn_available(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


MATMUL_KERNELS = ("torch_mm", "onednn_packed")


@torch.inference_mode()
def matmul_peak(weights: list[torch.Tensor], m: int, passes: int = 5, min_seconds: float = 0.5,
                kernel: str = "torch_mm") -> dict:
    """Peak matmul FLOP/s over ``weights`` (each (d_out, d_in)) at M = ``m`` rows.

    One pass multiplies every weight once, in order — the matmuls of one decode step with their real
    memory traffic (distinct weights, not one cached matrix). The fastest pass is the peak.
    FLOPs per pass = 2·M·Σ d_out·d_in. kernel ``torch_mm``: ``torch.mm(x, Wᵀ)`` (what nn.Linear calls);
    ``onednn_packed``: W reordered once into oneDNN's blocked layout for M rows, then
    ``torch.ops.mkldnn._linear_pointwise`` (stock CPU torch; what a prepacked linear calls; CPU only).
    The inputs live on the weights' device; on CUDA each pass is bracketed by ``torch.cuda.synchronize``.
    """
    if kernel not in MATMUL_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(MATMUL_KERNELS)}, got {kernel!r}")
    device = weights[0].device
    if kernel == "onednn_packed" and device.type != "cpu":
        raise ValueError(f"kernel onednn_packed runs on CPU only, the weights are on {device}")
    xs = {w.shape[1]: torch.randn(m, w.shape[1], dtype=w.dtype, device=device) for w in weights}
    flops = 2 * m * sum(w.shape[0] * w.shape[1] for w in weights)
    if kernel == "torch_mm":
        ops = [(lambda x, w=w: torch.mm(x, w.t()), w.shape[1]) for w in weights]
    else:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, m) for w in weights]
        ops = [(lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""), w.shape[1])
               for p, w in zip(packed, weights)]
    for op, d_in in ops:                    # warm-up (allocator, kernels)
        op(xs[d_in])
    best, spent, n = float("inf"), 0.0, 0
    while n < passes or (spent < min_seconds and n < 10 * passes):
        sync(device)
        t = time.perf_counter()
        for op, d_in in ops:
            op(xs[d_in])
        sync(device)
        dt = time.perf_counter() - t
        best, spent, n = min(best, dt), spent + dt, n + 1
    return {"kernel": kernel, "rows": m, "flops_per_pass": flops, "pass_seconds_best": best, "passes": n,
            "peak_flops_per_s": flops / best}


@torch.inference_mode()
def backbone_decode_step_seconds(model, prompts: list[list[int]], steps: int = 16) -> float:
    """Median seconds of one decode step (one new token per row + greedy argmax) of a served model, through
    the engine's own path: ``model.step`` on a flat batch of decode tokens (``twin.model.FlatBatch``).

    ``model`` is a twin.model backbone (no deltas); the rows are ``prompts`` prefilled together as the
    chunks of one flat step, then ``steps`` decode steps are timed one by one.
    """
    from twin.model.batch import FlatBatch

    device = model.device
    n = len(prompts)
    cache = model.new_cache(n, max(len(p) for p in prompts) + steps + 2)
    flat = FlatBatch.build([], [(list(p), i, 0) for i, p in enumerate(prompts)], device, bucket=True)
    tok = model.step(flat, cache).argmax(-1).tolist()
    pos = [len(p) for p in prompts]
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        flat = FlatBatch.build([(tok[i], pos[i], i) for i in range(n)], [], device, bucket=True)
        tok = model.step(flat, cache).argmax(-1).tolist()
        sync(device)
        times.append(time.perf_counter() - t)
        pos = [q + 1 for q in pos]
    times.sort()
    return times[len(times) // 2]


def roofline(hf_model: nn.Module, served_backbone, prompts: list[list[int]], batch_size: int,
             log: Callable[[str], None] = lambda s: None) -> dict:
    """backbone_roofline_fraction = (2·M·Σ d_out·d_in / decode-step s) / peak matmul FLOP/s at the same shapes.

    The peak is the faster of ``torch.mm`` and oneDNN's prepacked linear (on CPU, where this torch has oneDNN
    for the dtype; on CUDA ``torch.mm`` alone, which is what nn.Linear/F.linear call there): the served model may run either, and a ceiling that one of them beats is no ceiling
    (measured: at batch 16 the prepacked backbone step ran at 1.7x the torch.mm figure).
    """
    weights = [m.weight.detach() for _, m in hf_model.named_modules() if type(m) is nn.Linear]
    rows = (prompts * (1 + batch_size // max(1, len(prompts))))[:batch_size]
    device = weights[0].device
    kernels = [k for k in MATMUL_KERNELS if k == "torch_mm" or _onednn_available(weights[0].dtype, device)]
    peaks = {k: matmul_peak(weights, batch_size, kernel=k) for k in kernels}
    peak = max(peaks.values(), key=lambda p: p["peak_flops_per_s"])
    step = backbone_decode_step_seconds(served_backbone, rows)
    achieved = peak["flops_per_pass"] / step
    shapes: dict[str, int] = {}
    for w in weights:
        key = f"{w.shape[0]}x{w.shape[1]}"
        shapes[key] = shapes.get(key, 0) + 1
    out = {"rows": batch_size, "linear_shapes": shapes, "step_matmul_flops": peak["flops_per_pass"],
           "kernels": {k: {"gflops_per_s": round(p["peak_flops_per_s"] / 1e9, 3),
                           "pass_seconds_best": round(p["pass_seconds_best"], 9), "passes": p["passes"]}
                       for k, p in peaks.items()},
           "peak_kernel": peak["kernel"], "matmul_pass_seconds_best": round(peak["pass_seconds_best"], 9),
           "peak_matmul_flops_per_s": peak["peak_flops_per_s"], "achieved_matmul_flops_per_s": achieved,
           "peak_matmul_gflops_per_s": round(peak["peak_flops_per_s"] / 1e9, 3),
           "backbone_decode_step_seconds": round(step, 9),
           "achieved_matmul_gflops_per_s": round(achieved / 1e9, 3),
           "backbone_roofline_fraction": round(achieved / peak["peak_flops_per_s"], 4),
           "dtype": str(weights[0].dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
           "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    log(f"roofline at M={batch_size}: " + ", ".join(f"{k} {v['gflops_per_s']:.1f}" for k, v in out["kernels"].items())
        + f" GFLOP/s; backbone decode step {step * 1e3:.1f} ms = {out['achieved_matmul_gflops_per_s']:.1f} "
        f"GFLOP/s ({out['backbone_roofline_fraction']:.2f} of the peak)")
    return out


def release(model) -> None:
    del model
    gc.collect()


# ---- vLLM (out of process: bench/vllm_peer.py under vLLM's own Python) ------------------------------
VLLM_PEER_MODES = ("vllm_base", "vllm_lora")
VLLM_SCRIPT = Path(__file__).with_name("vllm_peer.py")


def export_vllm_model(path: str | Path, out: str | Path) -> dict:
    """Write θ* and one PEFT LoRA adapter per expert as checkpoints a separate serving stack can load.

    ``out/model``: transformers' class for the artifact's config with θ* (``hf_backbone``, float32),
    ``save_pretrained`` (config.json + safetensors). ``out/adapters/<expert>``: the adapters exactly as
    ``peft_mixed_model`` builds them (lora_A = A_t, lora_B = B_t, lora_alpha = r), each saved by PEFT's
    ``save_pretrained`` (adapter_config.json + adapter_model.safetensors). Returns {"model": dir,
    "adapters": {expert: dir}, "rank": the largest LoRA rank}. Raises PeerError as ``peft_mixed_model`` does.
    """
    out = Path(out)
    hf = hf_backbone(path, "float32", "cpu")
    hf.save_pretrained(out / "model")        # before PEFT wraps the modules in place
    peft_model = peft_mixed_model(hf, path)
    names = read_manifest(path).expert_names
    peft_model.save_pretrained(out / "adapters", selected_adapters=names, save_embedding_layers=False)
    rank = max([c.r for c in peft_model.peft_config.values()]
               + [k for c in peft_model.peft_config.values() for k in c.rank_pattern.values()])
    release(peft_model)
    return {"model": out / "model", "adapters": {n: out / "adapters" / n for n in names}, "rank": rank}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (started with start_new_session=True), then reap it."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_vllm_job(python: str | Path, job_dir: str | Path, job: dict, timeout_s: float) -> dict:
    """Run ``bench/vllm_peer.py`` on ``job_dir`` (already holding model/ and adapters/) under ``python``.

    Writes ``job_dir/job.json``, sends the script's output to ``job_dir/vllm.log`` and returns the parsed
    ``results.json``. Raises PeerError (the interpreter, exit status or timeout, and the log's last 20
    lines) when the run cannot give results: the bench then skips the vLLM modes with that reason. A
    timeout or an interrupt kills vLLM's whole process tree.
    """
    job_dir = Path(job_dir)
    (job_dir / "job.json").write_text(json.dumps(job))
    log = job_dir / "vllm.log"

    def tail(n: int = 20) -> str:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.is_file() else []
        return "\n".join(x[:300] for x in lines[-n:]) or "(no output)"

    try:
        with open(log, "wb") as f:
            # its own process group: vLLM's engine core and worker are grandchildren that outlive a killed
            # parent, so a timeout or an interrupt kills the whole group
            proc = subprocess.Popen([str(python), str(VLLM_SCRIPT), str(job_dir)], stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=job_dir, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except BaseException:
                _kill_group(proc)
                raise
    except FileNotFoundError:
        raise PeerError(f"--vllm-python {python}: no such interpreter") from None
    except PermissionError:
        raise PeerError(f"--vllm-python {python}: not executable") from None
    except OSError as e:          # e.g. not a program this machine can run (ENOEXEC)
        raise PeerError(f"--vllm-python {python}: cannot run it ({e.strerror or e})") from None
    except subprocess.TimeoutExpired:
        raise PeerError(f"vLLM peer ({python}) did not finish within {timeout_s:.0f} s; its last output:\n"
                        f"{tail()}") from None
    if rc != 0 or not (job_dir / "results.json").is_file():
        raise PeerError(f"vLLM peer ({python}) exited with status {rc}; its last output:\n{tail()}")
    return json.loads((job_dir / "results.json").read_text())
