"""CUDA checks (run with `pytest -m gpu tests/gpu` on a machine with a GPU; skipped without one).

- fp32 on CUDA with TF32 off: the served model pinned to an expert equals transformers' own forward of
  that expert on the same GPU, for three families (tests/twin/families.py), to 1e-4 · max(1, max|logit|);
- the unified flat `step()` and token-bucket padding on CUDA equal the padded per-row path (the CPU
  checks of tests/twin/test_families.py, run with CUDA as the default device);
- lowrank (batched, pinned) and materialize (fused per request) give the same greedy tokens through the
  engine on CUDA fp32;
- a bf16 CUDA engine serves greedy completions over HTTP, streamed text equal to the non-streamed text;
- `twinserve bench --device cuda` runs the engine, the HF/PEFT peers and the roofline on the GPU.
"""
import json
import os

import pytest
import torch

from tests.twin import test_families as fam
from tests.twin.families import load_hf
from tests.twin.test_families import family_artifacts  # noqa: F401  (module fixture, reused as is)

# TWINSERVE_GPU_TEST_DEVICE=cpu runs the same checks on the CPU: a dry run of the test logic on a machine
# without a GPU, so that only CUDA itself is new when the tests reach one
DEVICE = os.environ.get("TWINSERVE_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs CUDA (no GPU on this machine)")]

FP32_FAMILIES = ["llama-gqa-llama3rope", "mistral-sliding", "gemma2"]


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls: with TF32 (10-bit mantissa) logits drift ~1e-3 and the 1e-4 comparisons mean nothing."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_artifacts(family_artifacts):  # noqa: F811
    """family_artifacts with each artifact loaded on the GPU (fp32) instead of the CPU."""
    from twin.loading import load_artifact

    def get(family: str):
        art_dir, experts, _ = family_artifacts(family)
        art = load_artifact(art_dir, device=DEVICE, dtype="float32")
        assert art.model.device.type == DEVICE
        return art_dir, experts, art
    return get


@pytest.mark.parametrize("family", FP32_FAMILIES)
def test_cuda_fp32_pinned_expert_equals_transformers(family, family_artifacts, no_tf32):  # noqa: F811
    _, experts, art = cuda_artifacts(family_artifacts)(family)
    ids = art.tokenizer.encode(fam.PROMPTS[0])
    T = len(art.expert_names)
    for t, name in enumerate(art.expert_names):
        w = torch.zeros(1, T, device=DEVICE)
        w[0, t] = 1.0
        hf = load_hf(experts[name]).to(DEVICE)
        with torch.device(DEVICE):      # the helpers' token tensors are made on the GPU
            got = fam.run(art.model, [ids], w)[0]
            ref = fam.hf_logits(hf, ids)
        assert got.device.type == ref.device.type == DEVICE and got.shape == ref.shape
        assert float(ref.std()) > 1e-2
        tol = 1e-4 * max(1.0, float(ref.abs().max()))
        diff = float((got - ref).abs().max())
        assert diff <= tol, f"{family} expert {name} on CUDA: max |Δlogit| {diff:.2e} > {tol:.1e}"


@pytest.mark.parametrize("family", FP32_FAMILIES)
def test_cuda_unified_step_equals_padded_forward(family, family_artifacts, no_tf32):  # noqa: F811
    get = cuda_artifacts(family_artifacts)
    with torch.device(DEVICE):     # the CPU checks' tensors (ids, w, slots, logits_at) are made on the GPU
        fam.test_unified_step_equals_separate_passes(family, get)
        fam.test_bucket_padding_changes_nothing(family, get)


def test_cuda_lowrank_and_materialize_agree_for_a_pinned_expert(tiny_artifact, no_tf32):
    """The batched activation-side path and the per-request fused weights give the same greedy tokens."""
    from tests.bench.test_bench import pinned_lowrank_and_materialize_agree

    pinned_lowrank_and_materialize_agree(tiny_artifact, DEVICE)


def test_bf16_cuda_matches_fp32_cpu(tiny_artifact):
    from twin.generate import prompt_logits
    from twin.loading import load_artifact
    cpu = load_artifact(tiny_artifact, device="cpu", dtype="float32")
    gpu = load_artifact(tiny_artifact, device=DEVICE, dtype="bfloat16" if DEVICE == "cpu" else "auto")
    assert gpu.model.dtype == torch.bfloat16
    t = len(cpu.expert_names)
    w = torch.softmax(torch.randn(3, t), -1)
    ids = torch.randint(4, 30, (3, 9)).tolist()
    ref = torch.cat(prompt_logits(cpu.model, ids, w))
    out = torch.cat(prompt_logits(gpu.model, ids, w))
    assert (out.float().cpu() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_bf16_cuda_engine_greedy_over_http_and_streaming(routed_artifact):
    from tests.conftest import app_client
    from tests.server.helpers import sse_events

    prompts = ["add two and three", "jim hikes up the hill", "purr"]
    with app_client(routed_artifact, device=DEVICE, dtype="bfloat16") as c:
        assert c.app.state.artifact.model.device.type == DEVICE
        assert c.app.state.artifact.model.dtype == torch.bfloat16
        for prompt in prompts:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            full = r.json()
            assert 1 <= full["usage"]["completion_tokens"] <= 8
            again = c.post("/v1/completions", json=body).json()
            assert again["choices"][0]["text"] == full["choices"][0]["text"]     # greedy is deterministic
            s = c.post("/v1/completions", json={**body, "stream": True})
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            events = sse_events(s.text.splitlines())
            assert events[-1] == "[DONE]"
            streamed = "".join(e["choices"][0]["text"] for e in events[:-1] if e.get("choices"))
            assert streamed == full["choices"][0]["text"], prompt
            assert events[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


def test_bench_runs_on_cuda(tmp_path):
    from bench.cli import run_bench

    out = tmp_path / "b.json"
    report = run_bench(None, out, synthetic=True, quick=True, requests=6, batch_sizes=[1, 4], max_tokens=4,
                       device=DEVICE, dtype="float32")
    written = json.loads(out.read_text())
    assert written["env"]["device"] == written["config"]["device"] == DEVICE
    if DEVICE == "cuda":
        assert written["env"]["device_name"] == torch.cuda.get_device_name()
    modes = {(r["mode"], r["batch_size"]) for r in report["runs"]}
    assert {("backbone", 4), ("lowrank", 4), ("hf_generate", 4), ("peft_mixed", 4), ("materialize", 1)} <= modes
    roof = written["config"]["artifacts"]["synthetic"]["roofline"]
    assert roof["device"].startswith(DEVICE)
    if DEVICE == "cuda":
        assert set(roof["kernels"]) == {"torch_mm"}       # oneDNN prepacking is CPU-only
    assert 0 < roof["backbone_roofline_fraction"]
    ident = written["identity"]
    assert ident["lowrank_pinned_vs_materialize"]["identical"] == ident["lowrank_pinned_vs_materialize"]["requests"]
    assert ident["hf_generate_vs_backbone"]["identical"] == ident["hf_generate_vs_backbone"]["requests"]
