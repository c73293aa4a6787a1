"""CLI validation: bad input exits 2 with `error: ...` naming the problem, before any request is sent."""
from __future__ import annotations

import pytest

from loadtest.cli import main


def _argv(tmp_path, url, *extra):
    return ["--url", url, "--out", str(tmp_path / "r.json"), "--no-progress", *extra]


@pytest.mark.parametrize("extra, words", [
    (["--mix", "reverse=1,nosuch=2"], ["nosuch", "available: reverse, shift, upper"]),
    (["--mix", "reverse=0"], ["reverse", "positive"]),
    (["--mix", "upper=-0.5"], ["upper", "positive"]),
    (["--mix", "reverse"], ["task=proportion"]),
    (["--requests", "0"], ["--requests"]),
    (["--rate", "0"], ["--rate"]),
    (["--concurrency", "0"], ["--concurrency"]),
    (["--duration", "-1"], ["--duration"]),
])
def test_bad_input_exits_2(fake, tasks_dir, tmp_path, capsys, extra, words):
    rc = main(_argv(tmp_path, fake.url, "--tasks", str(tasks_dir), *extra))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ")
    for w in words:
        assert w in err
    assert not (tmp_path / "r.json").exists() and fake.state.count == 0


def test_missing_files_exit_2(fake, tmp_path, capsys):
    assert main(_argv(tmp_path, fake.url, "--data", str(tmp_path / "nope.jsonl"))) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(_argv(tmp_path, fake.url, "--tasks", str(tmp_path / "nodir"))) == 2
    assert "nodir" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(_argv(tmp_path, fake.url, "--tasks", str(tmp_path / "empty"))) == 2
    assert "test.jsonl" in capsys.readouterr().err


def test_bad_url_exit_2(tasks_dir, tmp_path, capsys):
    assert main(_argv(tmp_path, "localhost:8000", "--tasks", str(tasks_dir))) == 2
    assert "--url" in capsys.readouterr().err


def test_rate_and_concurrency_are_exclusive(tasks_dir, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(_argv(tmp_path, "http://127.0.0.1:1", "--rate", "1", "--concurrency", "2"))
    assert e.value.code == 2


def test_data_file_with_labels_and_targets(fake, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "reverse abc=", "label": "reverse", "target": "cba"}\n'
                    '{"prompt": "shift abc=", "task": "shift", "target": "def"}\n'
                    '{"prompt": "upper abc="}\n')
    rc = main(_argv(tmp_path, fake.url, "--data", str(data), "--requests", "30", "--concurrency", "3"))
    assert rc == 0
    import json
    rep = json.loads((tmp_path / "r.json").read_text())
    t = rep["tasks"]
    assert set(t) == {"reverse", "shift", "unlabeled"}
    assert t["reverse"]["exact_match"] == 1.0 and t["shift"]["exact_match"] == 0.0
    assert t["unlabeled"]["exact_match"] is None and t["unlabeled"]["routing_accuracy"] is None
    assert rep["routing"]["labels"] == ["reverse", "shift"]


def test_registered_in_twinserve_cli(fake, tasks_dir, tmp_path, capsys):
    """`twinserve loadtest` goes through cli.main; bad input still exits 2 with the task named."""
    from cli.main import main as twinserve_main
    rc = twinserve_main(["loadtest", *_argv(tmp_path, fake.url, "--tasks", str(tasks_dir), "--mix", "bogus=1")])
    assert rc == 2 and "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        twinserve_main(["loadtest", "--help"])
    assert e.value.code == 0
    assert "--concurrency" in capsys.readouterr().out
