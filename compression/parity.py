"""The parity gate: the built artifact, served, against transformers' own forward of every expert.

After ``twinserve build`` writes an artifact, each expert t is run three ways on fixed prompts, fp32:

  served        the artifact through twinserve's model and the engine's step (a prefill step of chunks,
                then a decode step), pinned (w = one-hot t), lowrank path
  materialised  transformers' own model class loaded with θ* + δ̂_t (the stored, possibly quantised factors)
  reference     transformers' own model class loaded with θ_t (a PEFT adapter merged as merge_and_unload does)

served − materialised is **implementation error** (must be ≤ ``tol`` = 1e-4 in fp32, on logits scaled
to at most 1 — max|Δ| / max(1, max|logit|) — so that a trained model whose logits reach 30 is held to
the same relative fp32 rounding as a random one; the Twin layers, slot-cache attention and masks against
transformers); materialised − reference is **compression error**
(SVD truncation and factor quantisation; expected at low rank, reported, not gated). The backbone θ* is
checked the same way (served with w = None vs transformers with θ*). An implementation error above
``tol`` raises ParityError naming the expert and the first decoder block whose output differs.

All three run streamed (``WeightStream``): each holds one decoder block's fp32 weights (plus the embedding
or head while those run), read from the artifact or the checkpoints as the forward reaches it, so the gate
needs about a block and a vocabulary matrix of memory at any model size — never two models.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from twin.errors import TwinserveError

# Fixed prompts: plain text any tokenizer encodes; the char-level demo zoo included.
PROMPTS = ("the quick brown fox jumps over the lazy dog. ",
           "reverse hello= 12, 34; then: SHIFT abc",
           "Q: what is 7 + 5? A:")
DEFAULT_TOL = 1e-4
LOGITS_BUDGET = 512 * 2**20   # bytes of fp32 logits one shared gate batch may hold (several weightings per batch)


class ParityError(TwinserveError):
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


# ---- streamed weights: one decoder block resident at a time -----------------------------------------
class WeightStream:
    """Run a model whose tensors live on disk: before a unit (the embedding, one decoder block, the head) runs,
    its tensors are read in fp32 by ``load(name)``; after it they are dropped. Everything else (final norm,
    rotary buffers) is loaded once. So a forward holds one block, never the model, and every weight is read
    exactly as the served step reads it.

    ``names``: id(parameter) -> checkpoint name. ``extra``: per unit, callables that load (True) or drop
    (False) tensors that are not parameters (the Twin layers' factors).
    """

    def __init__(self, root: nn.Module, units: list[nn.Module], names: dict[int, str], load, extra=None):
        self.load = load
        self.extra = extra or {}
        self._handles = []
        self._streamed: dict[int, nn.Parameter] = {}
        for u in units:
            ps = list({id(p): p for _, p in u.named_parameters(remove_duplicate=False) if id(p) in names}.values())
            self._streamed.update((id(p), p) for p in ps)
            self._handles.append(u.register_forward_pre_hook(self._pre(u, ps)))
            self._handles.append(u.register_forward_hook(self._post(u, ps)))
        self.names = names
        self.resident = list({id(p): p for _, p in root.named_parameters(remove_duplicate=False)
                              if id(p) in names and id(p) not in self._streamed}.values())
        for p in self._streamed.values():
            p.data = torch.empty(0, dtype=p.dtype)

    def reload(self) -> None:
        """(Re)load the always-resident tensors with the current ``load``."""
        for p in self.resident:
            p.data = self.load(self.names[id(p)])

    def _pre(self, unit, ps):
        def hook(_m, _args):
            for p in ps:
                p.data = self.load(self.names[id(p)])
            for f in self.extra.get(id(unit), ()):
                f(True)
        return hook

    def _post(self, unit, ps):
        def hook(_m, _args, _out):
            for p in ps:
                p.data = torch.empty(0, dtype=p.dtype)
            for f in self.extra.get(id(unit), ()):
                f(False)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def decoder_blocks(model: nn.Module, num_layers: int) -> nn.ModuleList | None:
    """The ModuleList of ``num_layers`` decoder blocks inside a transformers model (None: not found)."""
    return next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers), None)


def units_of(hf: nn.Module, num_layers: int) -> list[nn.Module]:
    """Embedding, decoder blocks, head: the modules a streamed forward loads one at a time. A model whose
    blocks cannot be found streams only its embedding and head."""
    blocks = decoder_blocks(hf, num_layers)
    units = [hf.get_input_embeddings()]
    if blocks is not None:
        units.extend(blocks)
    head = hf.get_output_embeddings()
    if head is not None and head is not units[0]:
        units.append(head)
    return units


def _empty_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    # torch.empty of a large size is an untouched mapping: no resident memory until a unit loads it
    return {n: torch.empty(s, dtype=torch.float32) for n, s in shapes.items()}


def reference_skeleton(config) -> nn.Module:
    """transformers' own causal-LM class for ``config`` (fp32, eager attention), weights not yet loaded."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.tie_weights()
    return model.eval().requires_grad_(False)


class StreamedReference:
    """transformers' forward of any θ given tensor by tensor (θ*, θ* + δ̂_t or θ_t), one block resident."""

    def __init__(self, config, shapes: dict[str, tuple[int, ...]]):
        self.model = reference_skeleton(config)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        present = {id(p) for n, p in params.items() if n in shapes}   # a tied head is the embedding's object
        missing = [n for n, p in params.items() if n not in shapes and id(p) not in present]
        if missing:
            raise ParityError(f"reference model: checkpoint has no tensor {missing[0]}")
        names = {id(p): n for n, p in params.items() if n in shapes}
        head = self.model.get_output_embeddings()
        emb = self.model.get_input_embeddings()
        if head is not None and head.weight is emb.weight:   # tied: the head reads the embedding's tensor
            names[id(head.weight)] = next(n for n, p in params.items() if p is emb.weight and n in shapes)
        self._load = None
        self.stream = WeightStream(self.model, units_of(self.model, config.num_hidden_layers), names,
                                   lambda n: self._load(n))
        self.blocks = decoder_blocks(self.model, config.num_hidden_layers)

    @torch.inference_mode()
    def logits(self, load, seqs: list[list[int]], capture: list | None = None) -> list[torch.Tensor]:
        """One right-padded batch (causal attention: padding never reaches a real position); logits per prompt."""
        self._load = load
        self.stream.reload()
        n = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
        handles = _capture_blocks(self.blocks, capture)
        try:
            out = self.model(ids).logits.float()
        finally:
            for h in handles:
                h.remove()
        return [out[i, :len(s)] for i, s in enumerate(seqs)]


def _capture_blocks(blocks, capture: list | None):
    if capture is None or blocks is None:
        return []

    def hook(_m, _a, out):
        capture.append((out[0] if isinstance(out, tuple) else out).detach().float().clone())
    return [b.register_forward_hook(hook) for b in blocks]


class StreamedServed:
    """The artifact served by twinserve's own model and step — the path the engine runs — with θ* and each
    Twin layer's factors read per unit from the artifact's files."""

    def __init__(self, path: Path, manifest, config):
        from twin.artifact import BACKBONE, EXCLUSIVE, LazyTensors, stored_factors
        from twin.fusion import LowRankDeltas
        from twin.model import TwinModel

        self.backbone = LazyTensors(path, BACKBONE)
        exclusive = LazyTensors(path, EXCLUSIVE)
        names = manifest.expert_names
        shapes = {}
        for k in self.backbone:
            shapes[k] = tuple(self._shape(self.backbone, k))
        model = TwinModel(config, _empty_state(shapes))
        lowrank, dense = {}, {}
        for param, info in manifest.tensors.items():
            if info.kind == "lowrank":
                ranks = [info.ranks.get(n, 0) for n in names]
                d_out, d_in = info.shape
                idx = torch.cat([torch.full((r,), t, dtype=torch.long) for t, r in enumerate(ranks)])
                offsets = tuple(int(x) for x in torch.cumsum(torch.tensor([0, *ranks]), 0))
                lowrank[param] = LowRankDeltas(torch.empty(sum(ranks), d_in), torch.empty(d_out, sum(ranks)), idx,
                                               len(names), offsets)
            else:
                dense[param] = torch.stack([exclusive.get(f"{param}::{n}::delta").float() for n in names])
        model.attach_deltas(names, lowrank, dense)
        self.model = model
        hf = model.hf
        param_names = {id(p): n for n, p in model._state.items()}
        emb = hf.get_input_embeddings()
        emb_w = emb.weight if not hasattr(emb, "base_layer") else emb.base_layer.weight
        emb_name = next((n for n, p in model._state.items() if p is emb_w), None)
        if emb_name is not None:
            param_names.setdefault(id(emb_w), emb_name)
        # Twin layers' factors: loaded with the unit that holds the layer (a tied head shares the embedding's)
        by_obj = {id(d): p for p, d in lowrank.items()}
        paths = {id(m): n.replace(".base_layer", "") for n, m in hf.named_modules()}
        extra: dict[int, list] = {}
        units = units_of(hf, config.num_hidden_layers)
        in_units = {id(m): u for u in units for m in u.modules()}
        resident = object()     # Twin layers outside every unit (GPT-2's position embedding): loaded once
        for m in hf.modules():
            u = in_units.get(id(m))
            d = getattr(m, "deltas", None)
            if isinstance(d, LowRankDeltas):
                # a tied head shares the embedding's object; a Conv1D layer holds a transposed copy of its own
                param = by_obj.get(id(d), paths.get(id(m), "") + ".weight")
                if param not in lowrank:
                    raise ParityError(f"parity gate: cannot stream the factors of {paths.get(id(m))}")
                conv = id(d) not in by_obj
                extra.setdefault(id(u) if u is not None else resident, []).append(
                    self._factor_loader(d, param, names, exclusive, stored_factors, conv))
        for m in hf.modules():
            if isinstance(getattr(m, "deltas", None), LowRankDeltas):
                m.deltas.A_cat, m.deltas.B_cat = torch.empty(0), torch.empty(0)
        for f in extra.pop(resident, ()):
            f(True)
        self.names = names
        self.stream = WeightStream(hf, units, param_names, lambda n: self.backbone.get(n).float(), extra)
        self.stream.reload()
        self.blocks = decoder_blocks(hf, config.num_hidden_layers)

    @staticmethod
    def _shape(lt, key):
        from safetensors import safe_open
        with safe_open(str(lt.where[key]), framework="pt") as h:
            return h.get_slice(key).get_shape()

    @staticmethod
    def _factor_loader(d, param, names, exclusive, stored_factors, conv: bool):
        def load(on: bool) -> None:
            if not on:
                d.A_cat, d.B_cat = torch.empty(0), torch.empty(0)
                return
            parts = {}
            for n in names:
                for part in ("A", "B", "A_scale", "B_scale"):
                    key = f"{param}::{n}::{part}"
                    if key in exclusive:
                        parts[key] = exclusive.get(key)
            fs = [stored_factors(parts, param, n) for n in names]
            A = torch.cat([a for _, a in fs], 0)
            B = torch.cat([b for b, _ in fs], 1)
            if conv:
                A, B = B.T, A.T
            d.A_cat, d.B_cat = A.contiguous().float(), B.contiguous().float()
        return load

    @torch.inference_mode()
    def logits(self, seqs: list[list[int]], ws: list[torch.Tensor | None],
               capture: list | None = None) -> list[list[torch.Tensor]]:
        """The engine's own steps over every prompt under every expert weighting in ``ws`` in one batch (rows of
        different experts share each step): the prompt but its last two tokens as prefill chunks over two
        steps, then those two tokens as two decode steps. Returns out[g][i]: logits (len_i, V) of prompt i
        under ws[g]. ``capture`` (one weighting): each decoder block's output per prompt, (len_i, H)."""
        from twin.model import FlatBatch

        model = self.model
        rows = [(g, i) for g in range(len(ws)) for i in range(len(seqs))]
        cache = model.new_cache(len(rows), max(len(s) for s in seqs))
        plan = []                                      # per row: (prefill split a, prefill end p, length n)
        for _, i in rows:
            n = len(seqs[i])
            p = n - min(2, n - 1)
            plan.append((max(1, p // 2), p, n))
        steps = [[(r, 0, a) for r, (a, _, _) in enumerate(plan)],                      # chunk 1
                 [(r, a, p) for r, (a, p, _) in enumerate(plan) if p > a],             # chunk 2
                 [(r, p, p + 1) for r, (_, p, n) in enumerate(plan) if n > p],         # decode 1
                 [(r, p + 1, p + 2) for r, (_, p, n) in enumerate(plan) if n > p + 1]]  # decode 2
        logits: list[list[torch.Tensor]] = [[] for _ in rows]
        blocks: list[list[list[torch.Tensor]]] = []
        for k, spans in enumerate(steps):
            if not spans:
                continue
            seq = [seqs[rows[r][1]] for r, _, _ in spans]
            weights = None if all(w is None for w in ws) else [
                torch.zeros(len(self.names)) if ws[rows[r][0]] is None else ws[rows[r][0]] for r, _, _ in spans]
            if k < 2:
                flat = FlatBatch.build([], [(x[lo:hi], r, lo) for (r, lo, hi), x in zip(spans, seq)],
                                       weights=weights, logits="all")
            else:
                flat = FlatBatch.build([(x[lo], lo, r) for (r, lo, _), x in zip(spans, seq)], [], weights=weights)
            cap = [] if capture is not None else None
            handles = _capture_blocks(self.blocks, cap)
            try:
                out = model.step(flat, cache).float()
            finally:
                for h in handles:
                    h.remove()
            firsts = [first for first, _ in flat.chunk_logits] if k < 2 else list(range(len(spans)))
            for (r, lo, hi), first in zip(spans, firsts):
                logits[r].append(out[first:first + hi - lo])
            if cap is not None:   # block outputs (M, 1, H) -> per row, in position order
                starts = [st for st, _, _, _ in flat.segments] if k < 2 else list(range(len(spans)))
                for b, h in enumerate(cap):
                    if len(blocks) <= b:
                        blocks.append([[] for _ in rows])
                    for (r, lo, hi), st in zip(spans, starts):
                        blocks[b][r].append(h[st:st + hi - lo, 0])
        if capture is not None:
            capture.extend([torch.cat(parts) for parts in per_block] for per_block in blocks)
        out = [[torch.cat(logits[g * len(seqs) + i]) for i in range(len(seqs))] for g in range(len(ws))]
        return out


def prompt_ids(tokenizer, vocab_size: int, max_len: int) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        ids = [i for i in tokenizer.encode(p) if i < vocab_size][:max_len]
        if len(ids) >= 2:
            out.append(ids)
    if not out:
        raise ParityError("parity gate: the tokenizer encodes none of the fixed prompts")
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def first_differing_block(served_blocks: list, ref_blocks: list, seqs, tol: float) -> str:
    """The first decoder block whose output differs by more than ``tol`` (from hooks on both forwards)."""
    for i, (got, ref) in enumerate(zip(served_blocks, ref_blocks)):
        err = max(float((g - ref[j, :len(s)]).abs().max()) for j, (g, s) in enumerate(zip(got, seqs)))
        if err > tol:
            return f"decoder block {i} (its output differs from transformers' by {err:.3g} > {tol:g})"
    return "the final norm / lm_head (every decoder block matches)"


def check_parity(path: str | Path, expert_reader, tol: float = DEFAULT_TOL, max_len: int = 48,
                 console: Console | None = None, progress=None) -> dict:
    """Run the gate on the artifact at ``path``; return {"backbone": {...}, "experts": {name: {...}}}.

    ``expert_reader(manifest, t)`` gives a function name -> θ_t[name] (compression.experts.expert_tensors).
    Streamed: the served model, transformers' θ* + δ̂_t and transformers' θ_t each hold one decoder block at a
    time, so the gate's memory is a block plus the embedding/head, at any model size.
    Raises ParityError (exit 2) when an implementation error exceeds ``tol``.
    """
    from transformers import AutoTokenizer

    from twin.artifact import EXCLUSIVE, LazyTensors, read_manifest, stored_factors
    from twin.loading import config_from_manifest

    path = Path(path)
    manifest = read_manifest(path)
    config = config_from_manifest(manifest)
    tokenizer = AutoTokenizer.from_pretrained(str(path / manifest.tokenizer), local_files_only=True)
    seqs = prompt_ids(tokenizer, config.vocab_size, max_len)
    step = progress or (lambda what: None)
    served = StreamedServed(path, manifest, config)
    backbone = served.backbone
    shapes = {k: tuple(StreamedServed._shape(backbone, k)) for k in backbone}
    ref = StreamedReference(config, shapes)
    exclusive = LazyTensors(path, EXCLUSIVE)
    names = manifest.expert_names

    def theta_star(n: str) -> torch.Tensor:
        return backbone.get(n).float()

    def gate(err: float, what: str, w: torch.Tensor | None, load) -> None:
        if err > tol * scale:
            got, want = [], []
            served.logits(seqs, [w], capture=got)
            ref.logits(load, seqs, capture=want)
            where = first_differing_block(got, want, seqs, tol * scale)
            raise ParityError(f"parity gate: {what} served by twinserve differs from transformers with the same "
                              f"weights by {err:.3g} > {tol * scale:.3g} (max |Δlogit|; {tol:g} × logit scale "
                              f"{scale:.3g}); first difference at {where}")

    def materialised_of(name: str):
        def materialised(n: str) -> torch.Tensor:
            """θ* + δ̂_t for one tensor: the stored (dequantised) factors or dense delta, materialised."""
            x = theta_star(n)
            info = manifest.tensors.get(n)
            if info is None:
                return x
            if info.kind == "dense":
                return x + exclusive.get(f"{n}::{name}::delta").float()
            if not info.ranks.get(name):
                return x
            parts = {k: exclusive.get(k) for k in (f"{n}::{name}::{p}" for p in ("A", "B", "A_scale", "B_scale"))
                     if k in exclusive}
            B, A = stored_factors(parts, n, name)
            x2 = x.view(B.shape[0], A.shape[1])
            for lo in range(0, x2.shape[0], 8192):          # row blocks: no (d_out × d_in) temporary
                x2[lo:lo + 8192].addmm_(B[lo:lo + 8192], A)
            return x
        return materialised

    # θ* (w = 0) and every expert pinned, as rows of shared steps: groups sized so their logits stay in budget
    ws: list[torch.Tensor | None] = [None] + [torch.eye(len(names))[t] for t in range(len(names))]
    per_w = sum(len(x) for x in seqs) * config.vocab_size * 4
    group = max(2, LOGITS_BUDGET // max(1, per_w))
    results: list[ExpertParity] = []
    bb_err = scale = 0.0
    for lo in range(0, len(ws), group):
        members = list(range(lo, min(len(ws), lo + group)))
        step(f"served step: {len(members)} weightings × {len(seqs)} prompts in one batch")
        served_out = served.logits(seqs, [ws[g] for g in members])
        for g, got in zip(members, served_out):
            if g == 0:
                step("backbone θ*")
                ref_bb = ref.logits(theta_star, seqs)
                scale = max(1.0, max(float(r.abs().max()) for r in ref_bb))   # the gate is relative to it
                bb_err = _max_diff(got, ref_bb)
                gate(bb_err, "the backbone θ*", None, theta_star)
                continue
            t, name = g - 1, names[g - 1]
            step(f"expert {name} ({t + 1}/{len(names)})")
            materialised = materialised_of(name)
            mat = ref.logits(materialised, seqs)
            impl = _max_diff(got, mat)
            gate(impl, f"expert {name!r} (θ* + δ̂_t)", ws[g], materialised)
            theta_t = expert_reader(manifest, t)
            want = ref.logits(lambda n, f=theta_t: f(n).float(), seqs)
            agree = torch.cat([(x.argmax(-1) == r.argmax(-1)).float() for x, r in zip(got, want)]).mean()
            ranks = [e.ranks.get(name, 0) for e in manifest.tensors.values() if e.kind == "lowrank"]
            results.append(ExpertParity(name, _max_diff(got, want), float(agree), impl, _max_diff(mat, want),
                                        max(ranks, default=0)))
        del served_out
    if console is not None:
        print_parity(results, bb_err, tol, scale, console)
    return {"tolerance": tol, "logit_scale": round(scale, 4), "prompts": len(seqs),
            "served_path": "engine steps, θ* and the experts' rows in shared batches: two prefill chunk steps, "
                           "then two decode steps",
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


def record_parity(path: str | Path, report: dict | None, skipped: bool = False, extra: dict | None = None) -> None:
    """Write the gate's result into report.json (``parity``) and the manifest (``parity``, ``skip_parity``).
    ``extra``: phase times and the preflight estimate, added to report.json's ``build``."""
    import json

    from twin.artifact import REPORT, read_report, update_artifact

    full = read_report(path)
    full["parity"] = report if not skipped else {"skipped": True}
    if extra:
        build = full.setdefault("build", {})
        phases = build.setdefault("phases", {})
        for k in ("gate_s", "total_s"):
            if k in extra:
                phases[k] = extra[k]
        if extra.get("estimate") is not None:
            build["estimate"] = extra["estimate"]
    experts = {} if skipped else {k: {kk: v[kk] for kk in ("max_abs_logit_diff", "argmax_agreement", "rank")}
                                  | {"implementation_error": v["implementation_error"],
                                     "compression_error": v["compression_error"]}
                                  for k, v in report["experts"].items()}
    update_artifact(path, {REPORT: json.dumps(full, indent=2)},
                    {"parity": experts or None, "skip_parity": skipped})
