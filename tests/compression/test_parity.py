"""The parity gate of `twinserve build`: served artifact vs transformers, per expert, with a real failure."""
from __future__ import annotations

import json

import pytest
import yaml

from cli.main import main
from tests.twin.families import save_family
from twin.artifact import read_manifest, read_report


def write_recipe(path, base, experts, rank: int) -> str:
    recipe = {"base": str(base), "experts": [{"name": n, "path": str(p)} for n, p in experts.items()],
              "merge": {"method": "task_arithmetic", "lam": 0.5}, "rank": {"rank": rank}}
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return save_family("qwen2-sliding", root)


def test_build_reports_parity_per_expert(tmp_path, capsys, family_dirs):
    base, experts = family_dirs
    out = tmp_path / "art"
    assert main(["build", write_recipe(tmp_path / "r.yaml", base, experts, rank=4), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "parity vs transformers" in err and "e0" in err and "e1" in err
    report = read_report(out)["parity"]
    assert report["backbone_max_abs_logit_diff"] <= 1e-4
    for name in ("e0", "e1"):
        entry = report["experts"][name]
        assert entry["implementation_error"] <= 1e-4          # Twin layers vs transformers, same weights
        assert entry["compression_error"] > 1e-3              # rank 4 of 64 really truncates ...
        assert entry["max_abs_logit_diff"] >= entry["compression_error"] - 1e-4
        assert entry["rank"] == 4 and 0.0 <= entry["argmax_agreement"] <= 1.0
    manifest = read_manifest(out)
    assert manifest.parity["e0"].max_abs_logit_diff == report["experts"]["e0"]["max_abs_logit_diff"]
    assert manifest.skip_parity is False


def test_full_rank_build_serves_each_expert_exactly(tmp_path, family_dirs):
    base, experts = family_dirs
    out = tmp_path / "art"
    assert main(["build", write_recipe(tmp_path / "r.yaml", base, experts, rank=64), "-o", str(out)]) == 0
    for entry in read_report(out)["parity"]["experts"].values():
        assert entry["max_abs_logit_diff"] <= 1e-4 and entry["argmax_agreement"] == 1.0


def test_broken_implementation_fails_the_gate(tmp_path, capsys, family_dirs, monkeypatch):
    """A served model with a wrong RMSNorm eps (as a mis-read config would give) exits 2, names the expert
    or backbone and the first differing block, and leaves no artifact behind."""
    from twin.model import hf

    real_init = hf.HFTwinModel.__init__

    def wrong_eps(self, config, state):
        real_init(self, config, state)
        for m in self.hf.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.variance_epsilon = 0.5

    monkeypatch.setattr(hf.HFTwinModel, "__init__", wrong_eps)
    base, experts = family_dirs
    out = tmp_path / "art"
    assert main(["build", write_recipe(tmp_path / "r.yaml", base, experts, rank=4), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "parity gate" in err and "decoder block 0" in err
    assert not out.exists()


def test_skip_parity_is_recorded(tmp_path, family_dirs):
    base, experts = family_dirs
    out = tmp_path / "art"
    assert main(["build", write_recipe(tmp_path / "r.yaml", base, experts, rank=4), "-o", str(out),
                 "--skip-parity"]) == 0
    assert read_manifest(out).skip_parity is True
    assert json.loads((out / "report.json").read_text())["parity"] == {"skipped": True}


def test_unsupported_architecture_is_refused_before_merging(tmp_path, capsys):
    from transformers import T5Config

    base = tmp_path / "t5"
    T5Config(d_model=16, num_layers=1, num_heads=2, vocab_size=37).save_pretrained(str(base))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "experts": [{"name": "a", "path": str(base)}]}))
    assert main(["build", str(recipe), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'t5'" in err and "supported: llama" in err
    assert not (tmp_path / "out").exists()
