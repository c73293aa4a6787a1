"""CUDA + bf16 path (run with `pytest -m gpu` on a machine with a GPU)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU on this machine)")]


def test_bf16_cuda_matches_fp32_cpu(tiny_artifact):
    from twin.loading import load_artifact
    cpu = load_artifact(tiny_artifact, device="cpu", dtype="float32")
    gpu = load_artifact(tiny_artifact, device="cuda", dtype="auto")
    assert gpu.model.dtype == torch.bfloat16
    t = len(cpu.expert_names)
    w = torch.softmax(torch.randn(3, t), -1)
    ids = torch.randint(4, 30, (3, 9))
    pos = torch.arange(9).expand(3, 9)
    ref = cpu.model(ids, pos, cpu.model.new_cache(3, 16), torch.arange(3), w)
    out = gpu.model(ids.cuda(), pos.cuda(), gpu.model.new_cache(3, 16), torch.arange(3, device="cuda"), w.cuda())
    assert (out.float().cpu() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_engine_serves_on_cuda(tiny_artifact):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings
    with TestClient(create_app(Settings(artifact=str(tiny_artifact), device="cuda"))) as c:
        r = c.post("/v1/completions", json={"model": tiny_artifact.name, "prompt": "ab", "max_tokens": 4,
                                            "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
