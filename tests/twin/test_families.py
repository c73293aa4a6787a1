"""Family matrix: every architecture the transformers backend serves, against transformers itself.

For each family (tests/twin/families.py) a tiny base and two full fine-tune experts are built into an
artifact at full rank with fp32 factors, then:
  - the served model pinned to expert t equals transformers' forward of θ_t (and of the materialised
    θ* + δ̂_t) to 1e-4, on a prompt longer than every sliding window;
  - a mixed batch (rows pinned to different experts or to θ*, different prompt lengths, a decode step
    after the prefill) gives each row exactly what it gets alone;
  - greedy text over HTTP equals transformers' ``generate`` of the expert.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import app_client, make_recipe
from tests.twin.families import FAMILIES, load_hf, save_family
from twin.artifact import read_report
from twin.loading import load_artifact

TOL = 1e-4
FULL_RANK = {"merge": {"method": "task_arithmetic", "lam": 0.5}, "rank": {"rank": 64}}
PROMPTS = ["add two and three, then five", "jim hikes", "purr ok"]   # 29, 10, 8 tokens with <bos>


@pytest.fixture(scope="module")
def family_artifacts(tmp_path_factory):
    from compression.cli import build_with_parity

    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            base, experts = save_family(family, root)
            art_dir = root / "tiny"
            build_with_parity(make_recipe(base, experts, **FULL_RANK), art_dir, quiet=True)   # as `twinserve build`
            cache[family] = (art_dir, experts, load_artifact(art_dir, device="cpu", dtype="float32"))
        return cache[family]
    return get


def run(model, seqs: list[list[int]], w: torch.Tensor | None) -> list[torch.Tensor]:
    """The engine's step: every row's prompt as a prefill chunk of one step (per-row w), then one decode step
    of token 5 for every row: per row (len+1, V) logits."""
    from twin.model.batch import FlatBatch

    ws = None if w is None else list(w)
    cache = model.new_cache(len(seqs) + 1, max(len(x) for x in seqs) + 2)   # slots 1..n: slots are indices
    pre = FlatBatch.build([], [(x, i + 1, 0) for i, x in enumerate(seqs)], weights=ws, logits="all")
    dec = FlatBatch.build([(5, len(x), i + 1) for i, x in enumerate(seqs)], [], weights=ws)
    with torch.inference_mode():
        p, d = model.step(pre, cache), model.step(dec, cache)
    return [torch.cat([p[first:first + n], d[i:i + 1]]) for i, (first, n) in enumerate(pre.chunk_logits)]


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids + [5]])).logits[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pinned_expert_equals_transformers(family, family_artifacts):
    _, experts, art = family_artifacts(family)
    tok = art.tokenizer
    ids = tok.encode(PROMPTS[0])
    assert len(ids) > 2 * 6, "the prompt must be longer than the sliding window"
    T = len(art.expert_names)
    for t, name in enumerate(art.expert_names):
        w = torch.zeros(1, T)
        w[0, t] = 1.0
        got = run(art.model, [ids], w)[0]
        ref = hf_logits(load_hf(experts[name]), ids)
        assert got.shape == ref.shape
        assert float(ref.std()) > 1e-2
        diff = float((got - ref).abs().max())
        assert diff <= TOL, f"{family} expert {name}: max |Δlogit| {diff:.2e} against transformers"
        # the materialised reference θ* + δ̂_t in transformers' own class, through the fused path
        fused = art.model.fused(w[0])
        assert float((run(fused, [ids], None)[0] - got).abs().max()) <= TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_build_parity_gate_reports_exact_experts(family, family_artifacts):
    """`twinserve build`'s gate on every family: at full rank with fp32 factors each expert is exact."""
    art_dir, _, _ = family_artifacts(family)
    parity = read_report(art_dir)["parity"]
    assert parity["backbone_max_abs_logit_diff"] <= TOL
    assert set(parity["experts"]) == {"e0", "e1"}
    for entry in parity["experts"].values():
        assert entry["implementation_error"] <= TOL and entry["max_abs_logit_diff"] <= TOL
        assert entry["argmax_agreement"] == 1.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_backbone_equals_transformers(family, family_artifacts, tmp_path):
    from safetensors.torch import save_file

    _, _, art = family_artifacts(family)
    ids = art.tokenizer.encode(PROMPTS[1])
    state = art.model.backbone_state()
    (tmp_path / "bb").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bb" / "model.safetensors"),
              metadata={"format": "pt"})
    art.config.save_pretrained(str(tmp_path / "bb"))
    ref = hf_logits(load_hf(tmp_path / "bb"), ids)
    assert float((run(art.model, [ids], None)[0] - ref).abs().max()) <= TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_batch_rows_equal_alone(family, family_artifacts):
    _, _, art = family_artifacts(family)
    seqs = [art.tokenizer.encode(p) for p in PROMPTS]
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    together = run(art.model, seqs, w)
    for i, s in enumerate(seqs):
        alone = run(art.model, [s], w[i:i + 1])[0]
        assert float((together[i] - alone).abs().max()) <= TOL, f"{family} row {i}"
    backbone_row = run(art.model, seqs[:1], torch.zeros(1, 2))[0]
    assert float((backbone_row - run(art.model, seqs[:1], None)[0]).abs().max()) <= TOL


@pytest.mark.parametrize("family", ["llama-tied", "mistral-sliding", "gemma2", "gpt2"])
def test_greedy_http_equals_transformers_generate(family, family_artifacts):
    art_dir, experts, art = family_artifacts(family)
    prompt = PROMPTS[0]
    ids = art.tokenizer.encode(prompt)
    hf = load_hf(experts["e1"])
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                          eos_token_id=art.tokenizer.eos_token_id, pad_token_id=0)
    expected = art.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    with app_client(art_dir) as client:
        r = client.post("/v1/completions", json={"model": "tiny:e1", "prompt": prompt, "max_tokens": 10,
                                                 "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected


@pytest.mark.parametrize("family", ["llama-gqa-llama3rope", "qwen2-sliding", "gemma2", "phi3", "gpt2"])
@pytest.mark.parametrize("layout", ["prepack", "stack_shrink"])
def test_prepacked_weights_give_the_same_logits(family, family_artifacts, layout):
    """oneDNN-prepacked layers (CPU) and [W*; A_cat]-stacked layers (what a GPU loads) serve the same model."""
    from twin.model.kernels import can_prepack

    art_dir, _, _ = family_artifacts(family)
    plain = load_artifact(art_dir, device="cpu", dtype="float32")
    packed = load_artifact(art_dir, device="cpu", dtype="float32")
    if layout == "prepack" and not can_prepack(packed.model.device, packed.model.dtype):
        pytest.skip("no oneDNN on this CPU build of torch")
    n = packed.model.prepack(batch_hint=4) if layout == "prepack" else packed.model.stack_shrink()
    assert n > 0 or family == "gpt2"          # GPT-2's projections are Conv1D: nothing to pack
    seqs = [plain.tokenizer.encode(p) for p in PROMPTS]
    w = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.0, 0.0]])
    before = {k: v.clone() for k, v in plain.model.backbone_state().items()}
    for a, b in zip(run(plain.model, seqs, w), run(packed.model, seqs, w)):
        assert float((a - b).abs().max()) <= TOL
    # the deltas are added into fresh layer outputs (in place): θ* itself is never written
    assert all(torch.equal(before[k], t) for k, t in plain.model.backbone_state().items())
    # the reference paths unpack exactly: θ* and the materialised θ* + Σ w_t δ̂_t
    state_a, state_b = plain.model.backbone_state(), packed.model.backbone_state()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    fused_a, fused_b = plain.model.fused(w[1]).backbone_state(), packed.model.fused(w[1]).backbone_state()
    assert all(torch.equal(fused_a[k], fused_b[k]) for k in fused_a)


def alone(model, ids: list[int], extra: list[int], w_row: torch.Tensor) -> torch.Tensor:
    """Logits after the whole prompt and after each extra token of one sequence on its own: its prompt as
    one step, then one step per extra token: (1+len(extra), V)."""
    from twin.model.batch import FlatBatch

    cache = model.new_cache(1, len(ids) + len(extra) + 1)
    with torch.inference_mode():
        out = [model.step(FlatBatch.build([], [(ids, 0, 0)], weights=[w_row]), cache)[0]]
        for i, t in enumerate(extra):
            out.append(model.step(FlatBatch.build([(t, len(ids) + i, 0)], [], weights=[w_row]), cache)[0])
    return torch.stack(out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unified_step_equals_separate_passes(family, family_artifacts):
    """Prefill chunks and decode tokens of different rows in one flat forward (the engine's unified step)
    give each row exactly what it gets alone, one step at a time."""
    from twin.model.batch import FlatBatch

    _, _, art = family_artifacts(family)
    m = art.model
    a, b = (art.tokenizer.encode(p) for p in PROMPTS[:2])            # 29 and 10 tokens
    wa, wb = torch.tensor([1.0, 0.0]), torch.tensor([0.3, 0.7])
    cache = m.new_cache(3, 40)

    def step(decode, chunks, w_rows, logits):
        flat = FlatBatch.build(decode, chunks, weights=w_rows, logits=logits)
        with torch.inference_mode():
            return m.step(flat, cache)

    # step 1: A's first 12 prompt tokens (slot 1) and all of B (slot 2); logits only at B's last token
    s1 = step([], [(a[:12], 1, 0), (b, 2, 0)], [wa, wb], ["none", "last"])
    # step 2: B decodes token 5 at its next position; A's remaining prompt chunk; logits at both
    s2 = step([(5, len(b), 2)], [(a[12:], 1, 12)], [wb, wa], "last")
    # step 3: both decode (slots 1, 2: a dense range)
    s3 = step([(7, len(a), 1), (9, len(b) + 1, 2)], [], [wa, wb], "last")
    ref_a = alone(m, a, [7], wa)
    ref_b = alone(m, b, [5, 9], wb)
    got_a = torch.stack([s2[1], s3[0]])
    got_b = torch.stack([s1[0], s2[0], s3[1]])
    assert float((got_a - ref_a).abs().max()) <= TOL, family
    assert float((got_b - ref_b).abs().max()) <= TOL, family


@pytest.mark.parametrize("family", ["llama-gqa-llama3rope", "gemma2", "gpt2"])
def test_bucket_padding_changes_nothing(family, family_artifacts):
    """Padding a step to its token bucket adds inert rows: same logits, no cache writes."""
    from twin.model.batch import FlatBatch, token_bucket

    _, _, art = family_artifacts(family)
    m = art.model
    ids = art.tokenizer.encode(PROMPTS[0])[:13]             # 13 -> bucket 16
    w = torch.tensor([0.4, 0.6])
    out = {}
    for bucket in (False, True):
        cache = m.new_cache(2, 40)
        flat = FlatBatch.build([], [(ids, 1, 0)], bucket=bucket, weights=[w], logits="all")
        assert flat.num_tokens == (token_bucket(13) if bucket else 13) and flat.num_real == 13
        with torch.inference_mode():
            prefill = m.step(flat, cache)
            dec = FlatBatch.build([(5, 13, 1)], [], bucket=bucket, weights=[w])
            step = m.step(dec, cache)
        out[bucket] = (prefill, step, cache.k[0][0].clone())
    assert float((out[True][0] - out[False][0]).abs().max()) <= TOL
    assert float((out[True][1] - out[False][1]).abs().max()) <= TOL
    assert torch.equal(out[True][2], out[False][2])          # slot 0 (where padding points) untouched


@pytest.mark.parametrize("family", ["llama-tied", "gpt2", "phi3"])
def test_linear_macs_count_every_matmul(family, family_artifacts):
    """θ*'s MACs per token from transformers' own modules; the factors' from the stored A/B shapes."""
    from safetensors import safe_open
    from transformers.pytorch_utils import Conv1D

    from twin.artifact import EXCLUSIVE

    art_dir, _, _ = family_artifacts(family)
    hf = load_hf(art_dir.parent / "base")
    want_backbone = sum(m.in_features * m.out_features if isinstance(m, torch.nn.Linear) else m.weight.numel()
                        for m in hf.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    emb = next(n for n, p in hf.named_parameters() if p is hf.get_input_embeddings().weight)
    lookups = {f"{n}.weight" for n, m in hf.named_modules() if isinstance(m, torch.nn.Embedding)}  # GPT-2's wpe too
    want_factors = 0
    with safe_open(str(art_dir / EXCLUSIVE), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            param, _, part = key.split("::")
            if part != "A":
                continue
            r, d_in = f.get_slice(key).get_shape()
            d_out = f.get_slice(key[:-1] + "B").get_shape()[0]
            if param in lookups:   # lookup of B's row, then · A; a tied head multiplies by both factors
                tied_head = param == emb and hf.config.tie_word_embeddings
                want_factors += r * d_in + (r * (d_in + d_out) if tied_head else 0)
            else:
                want_factors += r * (d_in + d_out)
    plain = load_artifact(art_dir, device="cpu", dtype="float32")
    assert plain.model.linear_macs() == {"backbone": want_backbone, "factors": want_factors}
    assert want_factors > 0
    plain.model.prepack(batch_hint=4)          # packed layers report the same shapes
    assert plain.model.linear_macs() == {"backbone": want_backbone, "factors": want_factors}
    stacked = load_artifact(art_dir, device="cpu", dtype="float32")
    stacked.model.stack_shrink()               # and so do stacked ones
    assert stacked.model.linear_macs() == {"backbone": want_backbone, "factors": want_factors}
