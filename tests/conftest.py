"""Shared test helpers: tiny random HF models, a char tokenizer, expert dirs and a built artifact.

Everything is built locally (no downloads). The helpers are plain functions so any test can call
them with its own arguments (``from tests.conftest import make_tiny_llama``); the session fixtures
build one standard set (base + 3 full fine-tune experts + artifact) that tests must treat as
read-only: copy it first (``artifact_copy``) before tampering or updating.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP/MKL spin-waiting
# makes small LAPACK calls (SVD) ~500x slower. One thread keeps the suite fast and its timings stable.
# TWINSERVE_TEST_THREADS=N overrides.
torch.set_num_threads(int(os.environ.get("TWINSERVE_TEST_THREADS", "1")))

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz") + list(" .,!?'\n")  # 4 + 33 = 37 tokens
EXPERT_NAMES = ["math", "code", "chat"]

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128}


# ----------------------------------------------------------------------------- tokenizer

def make_char_tokenizer():
    """A char-level fast tokenizer (BPE with a char vocab and no merges; Fuse decoder)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.add_bos_token = True  # Llama-style: the tokenizer itself prepends <bos>
    return fast


def save_char_tokenizer(out: str | Path):
    tok = make_char_tokenizer()
    tok.save_pretrained(str(out))
    return tok


# ----------------------------------------------------------------------------- models

def tiny_config(arch: str = "llama", **overrides):
    """Config of a tiny causal LM: hidden 32, 2 layers, 4 heads, 2 kv heads, intermediate 64, vocab 37."""
    from transformers import LlamaConfig, Qwen2Config

    ids = {t: i for i, t in enumerate(SPECIALS)}
    kw = dict(TINY, vocab_size=len(SPECIALS) + len(CHARS), pad_token_id=ids["<pad>"],
              bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], tie_word_embeddings=False)
    kw.update(overrides)
    if arch == "llama":
        return LlamaConfig(**kw)
    if arch == "qwen2":  # q/k/v projections carry biases
        return Qwen2Config(**kw)
    raise ValueError(f"unknown arch {arch!r}")


def make_tiny_model(seed: int = 0, arch: str = "llama", **overrides):
    """An in-memory random tiny model (fp32, eval mode); weights depend only on ``seed``."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = cls(cfg)
    # HF init leaves norms at exactly 1 and some tensors tiny; jitter everything so every
    # tensor (incl. 1-D ones) is distinct and non-degenerate.
    g = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_tiny_llama(out: str | Path, seed: int = 0, arch: str = "llama", tokenizer: bool = True,
                    **overrides) -> Path:
    """Save a tiny random LlamaForCausalLM (or Qwen2ForCausalLM) + char tokenizer into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_tiny_model(seed, arch, **overrides).save_pretrained(str(out))
    if tokenizer:
        save_char_tokenizer(out)
    return out


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def make_full_expert(base_dir: str | Path, out: str | Path, seed: int, scale: float = 0.02,
                     shared: float = 0.01, shared_seed: int = 12345) -> Path:
    """A full fine-tune expert dir: θ_t = θ_0 + shared·N_shared + scale·N_t (every tensor, 1-D too).

    The shared component (same for every expert) is what merging should keep in θ*; the
    per-expert part is the exclusive knowledge. The dir is a loadable HF model dir (config copied).
    """
    base_dir, out = Path(base_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g_shared = torch.Generator().manual_seed(shared_seed)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, w in sorted(load_state(base_dir).items()):
        noise = shared * torch.randn(w.shape, generator=g_shared) + scale * torch.randn(w.shape, generator=g)
        state[name] = (w.float() + noise).to(w.dtype).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json"):
        if (base_dir / f).is_file():
            shutil.copy(base_dir / f, out / f)
    return out


def make_recipe(base: str | Path, experts: dict[str, str | Path], **overrides):
    """A compression.recipe.Recipe; ``overrides`` may hold merge={...}, rank={...}, dtype=..."""
    from compression.recipe import Recipe

    data = {"base": str(base), "experts": [{"name": n, "path": str(p), "description": f"{n} expert"}
                                           for n, p in experts.items()]}
    data.update(overrides)
    return Recipe.model_validate(data)


def build_tiny_artifact(base: str | Path, experts: dict[str, str | Path], out: str | Path, **overrides) -> Path:
    from compression.build import build_artifact

    build_artifact(make_recipe(base, experts, **overrides), out, quiet=True)
    return Path(out)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (+ tokenizer) saved with save_pretrained; read-only."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "base", seed=0)


@pytest.fixture(scope="session")
def tiny_expert_dirs(tiny_base_dir, tmp_path_factory) -> dict[str, Path]:
    """Three full fine-tune experts of ``tiny_base_dir``: {"math", "code", "chat"} -> dir; read-only."""
    root = tmp_path_factory.mktemp("experts")
    return {name: make_full_expert(tiny_base_dir, root / name, seed=100 + i)
            for i, name in enumerate(EXPERT_NAMES)}


TINY_ARTIFACT_RECIPE = {"merge": {"method": "ties", "density": 0.5, "lam": 1.0}, "rank": {"rank": 8}}


@pytest.fixture(scope="session")
def tiny_artifact(tiny_base_dir, tiny_expert_dirs, tmp_path_factory) -> Path:
    """An artifact built from the tiny base + 3 experts (ties, density 0.5, rank 8, fp32); read-only."""
    return build_tiny_artifact(tiny_base_dir, tiny_expert_dirs,
                               tmp_path_factory.mktemp("artifacts") / "tiny", **TINY_ARTIFACT_RECIPE)


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path) -> Path:
    """A private copy of ``tiny_artifact`` that a test may tamper with or update."""
    dst = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, dst)
    return dst


# ----------------------------------------------------------------------------- router + server

# Easily separable synthetic router data: each expert's prompts start with its own word and use
# letters no other expert's prompts use, so the mean-pooled features of different tasks differ.
ROUTER_TASK_LETTERS = {"math": "abcdefg", "code": "hijklmn", "chat": "opqrstu"}
ROUTER_TASK_WORDS = {"math": "add", "code": "jim", "chat": "purr"}
ROUTER_UNKNOWN_LETTERS = "vwxyz"  # in no task: features far from every centroid


def router_prompt(task: str, rng) -> str:
    letters = ROUTER_TASK_LETTERS[task]
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(3, 5))]
    return " ".join([ROUTER_TASK_WORDS[task]] + words)


def router_rows(n_per_task: int = 30, seed: int = 0, tasks=EXPERT_NAMES) -> list[dict]:
    """Labelled router rows {"prompt", "task"}: n_per_task per task, deterministic in ``seed``."""
    import random

    rng = random.Random(seed)
    return [{"prompt": router_prompt(t, rng), "task": t} for t in tasks for _ in range(n_per_task)]


def write_router_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROUTER_TRAIN = {"layer": 1, "hidden": 32, "epochs": 120, "heldout": 0.25, "seed": 0}


@pytest.fixture(scope="session")
def routed_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """``tiny_artifact`` (3 experts) plus a router trained on ``router_rows`` at layer 1; read-only.

    The router's report (held-out accuracy, layer) is in the manifest's router section.
    """
    from rich.console import Console

    from router.train import save_router, train_router
    from twin.loading import load_artifact

    dst = tmp_path_factory.mktemp("artifacts") / "tiny"   # dir name = default model id "tiny"
    shutil.copytree(tiny_artifact, dst)
    art = load_artifact(dst, device="cpu", dtype="float32")
    router, report = train_router(art, router_rows(), console=Console(quiet=True), **ROUTER_TRAIN)
    save_router(dst, router, report)
    return dst


def server_settings(artifact: str | Path, **overrides):
    """Settings for tests: cpu fp32, model id "tiny", batch 8, short drain (torch threads: see the top)."""
    from server.settings import Settings

    kw = {"artifact": str(artifact), "model_name": "tiny", "device": "cpu", "dtype": "float32",
          "max_batch_size": 8, "drain_timeout_s": 2.0, "request_timeout_s": 60.0}
    kw.update(overrides)
    return Settings(**kw)


@contextlib.contextmanager
def app_client(artifact: str | Path, **overrides):
    """A fastapi TestClient over create_app(server_settings(...)); the lifespan (load + engine) runs inside.
    Mode `expert` reads the dense experts with compression's reader, as `twinserve serve` does."""
    from fastapi.testclient import TestClient

    from compression.experts import read_expert_state
    from server.app import create_app

    with TestClient(create_app(server_settings(artifact, **overrides), expert_reader=read_expert_state)) as client:
        yield client


@contextlib.contextmanager
def live_server(artifact: str | Path, **overrides):
    """uvicorn serving create_app(...) on 127.0.0.1:<free port> in a background thread.

    Yields an object with ``url`` (http://127.0.0.1:PORT), ``app`` and ``port``.
    """
    import threading
    import time
    import types

    import uvicorn

    from compression.experts import read_expert_state
    from server.app import create_app
    from twin.util import free_port

    app = create_app(server_settings(artifact, **overrides), expert_reader=read_expert_state)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    t_end = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("live server failed to start")
        if time.monotonic() > t_end:
            raise TimeoutError("live server did not start within 60 s")
        time.sleep(0.02)
    try:
        yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(routed_artifact):
    """TestClient over the routed artifact (lowrank mode, max_batch_size 8), shared by a module."""
    with app_client(routed_artifact) as c:
        yield c


@pytest.fixture(scope="session")
def server(routed_artifact):
    """A live uvicorn server over the routed artifact (see ``live_server``), shared by the session."""
    with live_server(routed_artifact) as s:
        yield s


def served_linear(x, weight, bias, d, w, kernel: str = "plain"):
    """The served op for one linear layer: a TwinLinear around nn.Linear(weight, bias) with factors ``d``, run
    with the step's ExpertMix(w) (None: θ* alone). ``kernel``: "plain", or the layouts serving uses after
    ``prepack`` (CPU oneDNN) and ``stack_shrink`` (GPU)."""
    import torch
    from torch import nn

    from twin.fusion import ExpertMix
    from twin.model.batch import StepContext
    from twin.model.kernels import PackedTwinLinear, StackedTwinLinear
    from twin.model.layers import TwinLinear

    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    layer = TwinLinear(lin, StepContext(mix=None if w is None else ExpertMix(w)))
    layer.deltas = d
    if kernel != "plain" and d is not None and d.rank:
        layer.base_layer = (PackedTwinLinear(lin, d, 4) if kernel == "packed" else StackedTwinLinear(lin, d))
        layer.deltas = None
    with torch.inference_mode():
        return layer(x)
