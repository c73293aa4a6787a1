"""TwinModel (transformers' class with routed low-rank deltas) through its step, against transformers and the
fused reference."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, LlamaForCausalLM, MistralConfig

from tests.conftest import make_tiny_model
from twin.artifact import BACKBONE, EXCLUSIVE, exclusive_key, read_manifest
from twin.generate import prompt_logits
from twin.loading import config_from_manifest, load_artifact
from twin.model import FlatBatch, TwinModel, UnsupportedModelError, check_supported

TOL = 1e-4
IDS = [2, 11, 7, 30, 4, 19, 25, 8, 36, 12, 5, 22, 17, 9, 33, 14, 20, 6]   # <bos> + 17 tokens (vocab 37)


def twin_from_hf(hf, drop_lm_head: bool = False) -> TwinModel:
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if drop_lm_head:  # tied checkpoints on disk carry no lm_head.weight
        state.pop("lm_head.weight", None)
    return TwinModel(hf.config, state).eval()


def twin_logits(model: TwinModel, ids: list[int], w: torch.Tensor | None = None) -> torch.Tensor:
    """Full-sequence logits (S, V) of one prompt: one prefill step, fresh cache."""
    return prompt_logits(model, [ids], None if w is None else w[None])[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------- backbone vs transformers

ARCHS = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)]


@pytest.mark.parametrize("arch,tied", ARCHS, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in ARCHS])
def test_logits_match_transformers(arch, tied):
    hf = make_tiny_model(seed=3, arch=arch, tie_word_embeddings=tied)
    state = hf.state_dict()
    if arch == "qwen2":
        b = state["model.layers.0.self_attn.q_proj.bias"]
        assert float(b.abs().max()) > 1e-3, "the q/k/v biases must be non-trivial for the test to mean anything"
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    twin = twin_from_hf(hf, drop_lm_head=tied)
    assert twin.tied == tied
    with torch.inference_mode():
        ref = hf(torch.tensor([IDS])).logits[0]
    got = twin_logits(twin, IDS)
    assert got.shape == ref.shape == (len(IDS), 37)
    assert max_diff(got, ref) <= TOL
    assert float(ref.std()) > 1e-3   # not a degenerate all-equal output


def test_unsupported_model_type_is_rejected():
    """Encoder-decoders and model classes without transformers' attention hooks are refused by name."""
    from transformers import T5Config

    with pytest.raises(UnsupportedModelError, match="'t5'.*encoder-decoder.*supported: llama"):
        check_supported(T5Config(d_model=32, num_layers=1, num_heads=4, vocab_size=37))
    check_supported(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=37))
    check_supported(MistralConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, sliding_window=4))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.inference_mode()
def test_chunked_prefill_and_decode_equal_transformers(arch):
    """A prompt in two prefill chunks, then one decode step per token, in slot 1 of a 3-slot cache."""
    hf = make_tiny_model(seed=4, arch=arch)
    model = twin_from_hf(hf)
    ref = hf(torch.tensor([IDS])).logits[0]
    cache = model.new_cache(3, 32)
    k = 6
    steps = [model.step(FlatBatch.build([], [(IDS[:4], 1, 0)], logits="all"), cache),
             model.step(FlatBatch.build([], [(IDS[4:k], 1, 4)], logits="all"), cache)]
    for p in range(k, len(IDS)):
        steps.append(model.step(FlatBatch.build([(IDS[p], p, 1)], []), cache))
    inc = torch.cat(steps)
    assert inc.shape == ref.shape
    assert max_diff(inc, ref) <= TOL


@torch.inference_mode()
def test_batched_prefill_and_decode_equal_each_sequence_alone():
    model = twin_from_hf(make_tiny_model(seed=5, arch="qwen2"))
    seqs = [IDS[:4], IDS, IDS[3:12], [2, 30]]
    slots = [3, 0, 2, 1]                       # rows need not sit in slot order
    cache = model.new_cache(len(seqs), max(map(len, seqs)) + 4)
    last = model.step(FlatBatch.build([], [(s, slot, 0) for s, slot in zip(seqs, slots)], bucket=True), cache)
    nxt = [13, 26, 8, 31]
    step = model.step(FlatBatch.build([(t, len(s), slot) for t, s, slot in zip(nxt, seqs, slots)], []), cache)
    for i, s in enumerate(seqs):
        alone = twin_logits(model, s + [nxt[i]])
        assert max_diff(last[i], alone[len(s) - 1]) <= TOL, f"row {i} prefill"
        assert max_diff(step[i], alone[len(s)]) <= TOL, f"row {i} decode"


# ----------------------------------------------------------------------------- experts on

W = torch.tensor([[1.0, 0.0, 0.0],      # one-hot
                  [0.2, 0.5, 0.3],      # soft
                  [0.0, 0.0, 1.0],      # another one-hot
                  [0.0, 0.7, 0.3],      # sparse soft
                  [0.0, 0.0, 0.0]])     # backbone only
PROMPTS = [IDS, IDS[:9], IDS[2:15], IDS[:5], IDS[1:]]


@pytest.fixture(scope="module")
def art(tiny_artifact):
    return load_artifact(tiny_artifact, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def batched(art):
    """PROMPTS as the chunks of one step, each row with its own w: logits per row (len, V)."""
    return prompt_logits(art.model, PROMPTS, W)


def materialised_state(artifact, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """θ* + Σ_t w_t B_t A_t (2-D) / θ* + Σ_t w_t δ_t (1-D), straight from the artifact files."""
    manifest = read_manifest(artifact)
    backbone = load_file(str(artifact / BACKBONE))
    exclusive = load_file(str(artifact / EXCLUSIVE))
    names = manifest.expert_names
    state = {}
    for key, t in backbone.items():
        t = t.float().clone()
        info = manifest.tensors.get(key)
        if info is not None:
            for wt, name in zip(w.tolist(), names):
                if info.kind == "lowrank":
                    t += wt * (exclusive[exclusive_key(key, name, "B")] @ exclusive[exclusive_key(key, name, "A")])
                else:
                    t += wt * exclusive[exclusive_key(key, name, "delta")]
        state[key] = t
    return state


def test_artifact_has_deltas_for_every_kind_of_layer(art):
    m = art.model
    assert m.num_experts == 3
    layers = m.twin_layers()
    assert layers["model.layers.0.self_attn.q_proj"].deltas.rank > 0
    assert layers["model.embed_tokens"].deltas is not None and layers["lm_head"].deltas is not None
    assert layers["model.layers.0.input_layernorm"].deltas is not None and layers["model.norm"].deltas is not None


def test_rows_really_differ(batched):
    # each expert moves the logits: otherwise the comparisons below would prove nothing
    n = len(PROMPTS[3])
    assert max_diff(batched[0][:n], batched[2][:n]) > 1e-2
    assert max_diff(batched[0][:n], batched[4][:n]) > 1e-2


def test_zero_weights_equal_backbone(art, batched):
    p = PROMPTS[4]
    assert max_diff(batched[4], twin_logits(art.model, p)) <= TOL


@pytest.mark.parametrize("row", range(len(W)))
def test_batched_lowrank_equals_materialised_fused(art, batched, row):
    p = PROMPTS[row]
    fused = art.model.fused(W[row])
    ref = twin_logits(fused, p)
    assert max_diff(batched[row], ref) <= TOL


@pytest.mark.parametrize("row", [0, 1, 3])
def test_batched_lowrank_equals_transformers_with_materialised_weights(tiny_artifact, art, batched, row):
    config = config_from_manifest(read_manifest(tiny_artifact))
    hf = LlamaForCausalLM(config).eval()
    missing, unexpected = hf.load_state_dict(materialised_state(tiny_artifact, W[row]), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    p = PROMPTS[row]
    with torch.inference_mode():
        ref = hf(torch.tensor([p])).logits[0]
    assert max_diff(batched[row], ref) <= TOL


@pytest.mark.parametrize("model_type,overrides,layer", [
    ("lfm2", {"layer_types": ["conv", "full_attention"] * 2, "num_hidden_layers": 4}, "Lfm2ShortConv"),
    ("recurrent_gemma", {}, "RecurrentGemmaRecurrentBlock"),
    ("zamba", {}, "ZambaMambaDecoderLayer")])
def test_layers_with_state_outside_attention_are_refused_from_the_config(model_type, overrides, layer):
    """Short convolutions, Mamba mixers and recurrent blocks keep a per-sequence state the step does not carry:
    refused by check_supported (the build's first check, seconds) naming the block and the class."""
    from transformers import AutoConfig

    with pytest.raises(UnsupportedModelError, match=f"{model_type!r} cannot be served exactly: decoder block 0: {layer}"):
        check_supported(AutoConfig.for_model(model_type, **overrides))
    check_supported(AutoConfig.for_model("qwen3_moe"))     # attention-only MoE: accepted
