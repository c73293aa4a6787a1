"""Fixtures: a shared fake streaming server (state reset per test) and a small tasks directory."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from zoo.tasks import TASKS, write_jsonl

from .fake_server import FakeServer

TEST_TASKS = ("reverse", "upper", "shift")  # the fake routes "shift" to "upper"


@pytest.fixture(scope="session")
def _fake_server():
    with FakeServer() as srv:
        yield srv


@pytest.fixture
def fake(_fake_server):
    _fake_server.state.reset()
    yield _fake_server
    _fake_server.state.reset()


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory) -> Path:
    """DIR/TASK/test.jsonl for reverse, upper, shift: 10 rows each {prompt, target, task}."""
    root = tmp_path_factory.mktemp("zoo") / "tasks"
    rng = random.Random(0)
    for name in TEST_TASKS:
        write_jsonl(root / name / "test.jsonl", [TASKS[name].example(rng) for _ in range(10)])
    return root
