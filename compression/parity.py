"""The parity gate: the built artifact, served, against transformers' own forward of every expert.

After ``twinserve build`` writes an artifact, each expert t is run three ways on fixed prompts, fp32:

  served        the artifact through twinserve's model, pinned (w = one-hot t), lowrank path
  materialised  transformers' own model class loaded with θ* + δ̂_t (the stored, possibly quantised factors)
  reference     transformers' own model class loaded with θ_t (a PEFT adapter merged as merge_and_unload does)

served − materialised is **implementation error** (must be ≤ ``tol`` = 1e-4 in fp32, on logits scaled
to at most 1 — max|Δ| / max(1, max|logit|) — so that a trained model whose logits reach 30 is held to
the same relative fp32 rounding as a random one; the Twin layers, slot-cache attention and masks against
transformers); materialised − reference is **compression error**
(SVD truncation and factor quantisation; expected at low rank, reported, not gated). The backbone θ* is
checked the same way (served with w = None vs transformers with θ*). An implementation error above
``tol`` raises ParityError naming the expert and the first layer whose hidden state differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

# Fixed prompts: plain text any tokenizer encodes; the char-level demo zoo included.
PROMPTS = ("the quick brown fox jumps over the lazy dog. ",
           "reverse hello= 12, 34; then: SHIFT abc",
           "Q: what is 7 + 5? A:")
DEFAULT_TOL = 1e-4


class ParityError(ValueError):
    """An expert served by the artifact differs from transformers beyond the tolerance (exit 2)."""


@dataclass
class ExpertParity:
    expert: str
    max_abs_logit_diff: float       # served vs θ_t (everything: compression + implementation)
    argmax_agreement: float         # fraction of positions where the served argmax equals θ_t's
    implementation_error: float     # served vs θ* + δ̂_t in transformers
    compression_error: float        # θ* + δ̂_t vs θ_t, both in transformers
    rank: int                       # largest r_t over this expert's tensors

    def to_json(self) -> dict:
        return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "expert"}


def reference_model(config, state: dict[str, torch.Tensor]):
    """transformers' own causal-LM class for ``config`` with ``state`` loaded (fp32, eager attention)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    missing, _unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    bad = [m for m in missing if m != "lm_head.weight" or not model.config.tie_word_embeddings]
    if bad:
        raise ParityError(f"reference model: checkpoint has no tensor {bad[0]}")
    return model.eval()


def prompt_ids(tokenizer, vocab_size: int, max_len: int) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        ids = [i for i in tokenizer.encode(p) if i < vocab_size][:max_len]
        if len(ids) >= 2:
            out.append(ids)
    if not out:
        raise ParityError("parity gate: the tokenizer encodes none of the fixed prompts")
    return out


@torch.inference_mode()
def _served(model, seqs, w: torch.Tensor | None) -> list[torch.Tensor]:
    out = []
    for ids in seqs:   # one prompt at a time: the gate checks the model, the engine tests check batching
        n = len(ids)
        cache = model.new_cache(1, n)
        logits = model(torch.tensor([ids]), torch.arange(n)[None], cache, torch.zeros(1, dtype=torch.long),
                       None if w is None else w[None])
        out.append(logits[0].float())
    return out


@torch.inference_mode()
def _reference(hf, seqs) -> list[torch.Tensor]:
    return [hf(torch.tensor([ids])).logits[0].float() for ids in seqs]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@torch.inference_mode()
def first_differing_layer(model, hf, ids: list[int], w: torch.Tensor | None, tol: float) -> str:
    """The first decoder block (HF module name) whose output hidden state differs by more than ``tol``."""
    n = len(ids)
    ref = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states   # (embeddings, block 1, …)
    layers = model.args.num_layers
    for i in range(1, layers + 1):
        got = model(torch.tensor([ids]), torch.arange(n)[None], model.new_cache(1, n, layers=i),
                    torch.zeros(1, dtype=torch.long), None if w is None else w[None], num_layers=i)
        if i == layers:  # transformers' last hidden state has the final norm applied
            break
        if float((got[0].float() - ref[i][0].float()).abs().max()) > tol:
            return f"decoder block {i - 1} (its output differs from transformers' by more than {tol:g})"
    return "the final norm / lm_head (every decoder block matches)"


def check_parity(path: str | Path, expert_reader, tol: float = DEFAULT_TOL, max_len: int = 48,
                 console: Console | None = None) -> dict:
    """Run the gate on the artifact at ``path``; return {"backbone": {...}, "experts": {name: {...}}}.

    ``expert_reader(manifest, t)`` gives θ_t's full state (compression.experts.read_expert_state).
    Raises ParityError (exit 2) when an implementation error exceeds ``tol``.
    """
    from twin.loading import load_artifact

    art = load_artifact(path, device="cpu", dtype="float32", verify=False)
    model, config = art.model, art.config
    seqs = prompt_ids(art.tokenizer, config.vocab_size, max_len)
    backbone = model.backbone_state()
    hf_bb = reference_model(config, backbone)
    ref_bb = _reference(hf_bb, seqs)
    scale = max(1.0, max(float(r.abs().max()) for r in ref_bb))   # logit scale: the gate is relative to it
    bb_err = _max_diff(_served(model, seqs, None), ref_bb)

    def gate(err: float, what: str, hf, w: torch.Tensor | None) -> None:
        if err > tol * scale:
            where = first_differing_layer(model, hf, seqs[0], w, tol * scale)
            raise ParityError(f"parity gate: {what} served by twinserve differs from transformers with the same "
                              f"weights by {err:.3g} > {tol * scale:.3g} (max |Δlogit|; {tol:g} × logit scale "
                              f"{scale:.3g}); first difference at {where}")

    gate(bb_err, "the backbone θ*", hf_bb, None)
    del hf_bb
    manifest = art.manifest
    names = art.expert_names
    results: list[ExpertParity] = []
    for t, name in enumerate(names):
        w = torch.zeros(len(names))
        w[t] = 1.0
        served = _served(model, seqs, w)
        hf_mat = reference_model(config, model.fused(w).backbone_state())
        mat = _reference(hf_mat, seqs)
        impl = _max_diff(served, mat)
        gate(impl, f"expert {name!r} (θ* + δ̂_t)", hf_mat, w)
        del hf_mat
        ref = _reference(reference_model(config, expert_reader(manifest, t)), seqs)
        agree = torch.cat([(s.argmax(-1) == r.argmax(-1)).float() for s, r in zip(served, ref)]).mean()
        ranks = [e.ranks.get(name, 0) for e in manifest.tensors.values() if e.kind == "lowrank"]
        results.append(ExpertParity(name, _max_diff(served, ref), float(agree), impl, _max_diff(mat, ref),
                                    max(ranks, default=0)))
    if console is not None:
        print_parity(results, bb_err, tol, scale, console)
    return {"tolerance": tol, "logit_scale": round(scale, 4), "prompts": len(seqs),
            "backbone_max_abs_logit_diff": round(bb_err, 8),
            "experts": {r.expert: r.to_json() for r in results}}


def print_parity(results: list[ExpertParity], backbone_err: float, tol: float, scale: float,
                 console: Console) -> None:
    table = Table(title=f"parity vs transformers (fp32; implementation error gate ≤ {tol:g} × logit scale "
                        f"{scale:.3g}; backbone "
                        f"{backbone_err:.1e})")
    for col in ("expert", "rank", "max |Δlogit| vs θ_t", "argmax agree", "implementation", "compression"):
        table.add_column(col, justify="left" if col == "expert" else "right")
    for r in results:
        table.add_row(r.expert, str(r.rank), f"{r.max_abs_logit_diff:.2e}", f"{r.argmax_agreement:.1%}",
                      f"{r.implementation_error:.1e}", f"{r.compression_error:.2e}")
    console.print(table)


def record_parity(path: str | Path, report: dict | None, skipped: bool = False) -> None:
    """Write the gate's result into report.json (``parity``) and the manifest (``parity``, ``skip_parity``)."""
    import json

    from twin.artifact import REPORT, read_report, update_artifact

    full = read_report(path)
    full["parity"] = report if not skipped else {"skipped": True}
    experts = {} if skipped else {k: {kk: v[kk] for kk in ("max_abs_logit_diff", "argmax_agreement", "rank")}
                                  | {"implementation_error": v["implementation_error"],
                                     "compression_error": v["compression_error"]}
                                  for k, v in report["experts"].items()}
    update_artifact(path, {REPORT: json.dumps(full, indent=2)},
                    {"parity": experts or None, "skip_parity": skipped})
