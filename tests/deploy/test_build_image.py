"""deploy/build-image.sh from any checkout: CONTAINER_BASE set to something that is not there stops the
build (exit 2, one line naming it) instead of quietly building another way; set, its --print-flags reach the
build; unset, a plain build that says so."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from .test_manifests import DEPLOY

SCRIPT = DEPLOY / "build-image.sh"


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def engine(tmp_path) -> tuple[Path, Path]:
    """A stand-in container engine that logs each call's arguments, one call a line."""
    log = tmp_path / "engine.log"
    return executable(tmp_path / "engine", f'#!/bin/sh\necho "$*" >> "{log}"\n'), log


def build(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], check=False, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_a_missing_container_base_stops_the_build(engine, tmp_path):
    eng, log = engine
    missing = tmp_path / "nowhere" / "container-base"
    r = build({"ENGINE": str(eng), "CONTAINER_BASE": str(missing)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "not an executable file" in lines[0]
    assert not log.exists()          # nothing was built
    (tmp_path / "nowhere").mkdir()
    missing.write_text("#!/bin/sh\n")   # present but not executable: refused the same way
    assert build({"ENGINE": str(eng), "CONTAINER_BASE": str(missing)}).returncode == 2 and not log.exists()


def test_container_base_flags_reach_the_build(engine, tmp_path):
    eng, log = engine
    helper = executable(tmp_path / "helper", '#!/bin/sh\n[ "$1" = --print-flags ] && echo "--pull=never '
                                             '--build-arg PIP_FIND_LINKS=/wheels"\nexit 0\n')
    r = build({"ENGINE": str(eng), "CONTAINER_BASE": str(helper), "TAG": "t:1", "TARGET": "demo"})
    assert r.returncode == 0, r.stderr
    built = [line for line in log.read_text().splitlines() if line.startswith("build ")]
    assert built == ["build --pull=never --build-arg PIP_FIND_LINKS=/wheels --target demo -t t:1 ."]


def test_unset_container_base_is_a_plain_build_that_says_so(engine):
    eng, log = engine
    env = {k: v for k, v in os.environ.items() if k != "CONTAINER_BASE"}
    r = subprocess.run(["bash", str(SCRIPT)], check=False, capture_output=True, text=True, timeout=60,
                       env={**env, "ENGINE": str(eng)})
    assert r.returncode == 0, r.stderr
    assert "plain" in r.stderr and "CONTAINER_BASE unset" in r.stderr
    built = [line for line in log.read_text().splitlines() if line.startswith("build ")]
    assert built == ["build --target runtime -t twinserve:latest ."]


def test_container_base_is_documented():
    readme = (DEPLOY / "README.md").read_text()
    assert "`CONTAINER_BASE`" in readme and "--print-flags" in readme and "exit code 2" in readme
