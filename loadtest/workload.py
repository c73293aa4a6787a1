"""Workload: prompts grouped by task label, and a seeded sampler that draws them in given proportions.

Prompts come either from the zoo's test splits (``DIR/TASK/test.jsonl``, rows ``{prompt, target, task}``)
or from one user JSONL file whose rows hold ``prompt`` plus ``label`` or ``task`` (and optionally
``target``). A mix ``"reverse=2,upper=1"`` gives relative proportions; without one every task present
is drawn equally often.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from twin.errors import TwinserveError

DEFAULT_TASKS_DIR = "artifacts/zoo/tasks"
DEFAULT_SPLIT = "test"
UNLABELED = "unlabeled"


class LoadtestError(TwinserveError):
    """Bad input to the load tester (mix, data files, options); the CLI turns it into exit code 2."""


@dataclass(frozen=True)
class Row:
    prompt: str
    task: str                   # the label used for grouping and as the expected routing expert
    target: str | None = None   # expected completion (exact match after strip), when known
    labeled: bool = True        # False for rows without label/task (grouped under "unlabeled")


def _read_rows(path: Path, default_task: str | None = None) -> list[Row]:
    rows: list[Row] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LoadtestError(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoadtestError(f"cannot read {path}: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise LoadtestError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise LoadtestError(f"{path}:{lineno}: each row needs a non-empty string 'prompt'")
        label = obj.get("label", obj.get("task", default_task))
        if label is not None and not isinstance(label, str):
            raise LoadtestError(f"{path}:{lineno}: 'label'/'task' must be a string")
        target = obj.get("target")
        if target is not None and not isinstance(target, str):
            target = str(target)
        rows.append(Row(prompt=obj["prompt"], task=label or UNLABELED, target=target, labeled=bool(label)))
    return rows


def _group(rows: list[Row]) -> dict[str, list[Row]]:
    pools: dict[str, list[Row]] = {}
    for r in rows:
        pools.setdefault(r.task, []).append(r)
    return pools


def load_tasks_dir(root: str | Path = DEFAULT_TASKS_DIR, split: str = DEFAULT_SPLIT) -> dict[str, list[Row]]:
    """``{task: rows}`` from ``root/TASK/<split>.jsonl`` (the directory name is the default label)."""
    root = Path(root)
    if not root.is_dir():
        raise LoadtestError(f"tasks directory not found: {root} (build the zoo with `twinserve zoo` "
                            "or pass --data FILE.jsonl)")
    files = sorted(p for p in root.glob(f"*/{split}.jsonl") if p.is_file())
    if not files:
        raise LoadtestError(f"no {split}.jsonl files under {root}/TASK/")
    pools: dict[str, list[Row]] = {}
    for f in files:
        rows = _read_rows(f, default_task=f.parent.name)
        if rows:
            pools.setdefault(f.parent.name, []).extend(rows)
    if not pools:
        raise LoadtestError(f"every {split}.jsonl under {root} is empty")
    return pools


def load_data_file(path: str | Path) -> dict[str, list[Row]]:
    """``{label: rows}`` from one JSONL file (rows without a label go to ``"unlabeled"``)."""
    pools = _group(_read_rows(Path(path)))
    if not pools:
        raise LoadtestError(f"data file is empty: {path}")
    return pools


def parse_mix(spec: str | None) -> dict[str, float] | None:
    """``"a=2,b=1"`` -> ``{"a": 2.0, "b": 1.0}``; proportions must be finite and > 0."""
    if spec is None or not spec.strip():
        return None
    mix: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise LoadtestError(f"--mix: expected task=proportion, got {part!r}")
        try:
            p = float(value)
        except ValueError:
            raise LoadtestError(f"--mix: proportion of task {name!r} is not a number: {value.strip()!r}") from None
        if not math.isfinite(p) or p <= 0:
            raise LoadtestError(f"--mix: proportion of task {name!r} must be positive, got {value.strip()}")
        if name in mix:
            raise LoadtestError(f"--mix: task {name!r} given twice")
        mix[name] = p
    if not mix:
        raise LoadtestError("--mix is empty")
    return mix


class Workload:
    """Prompt pools plus normalised task weights; ``sample(rng)`` picks a task, then a prompt of it."""

    def __init__(self, pools: dict[str, list[Row]], mix: dict[str, float] | None = None):
        if not pools:
            raise LoadtestError("no prompts to send")
        if mix is None:
            mix = {t: 1.0 for t in sorted(pools)}
        unknown = [t for t in mix if t not in pools]
        if unknown:
            raise LoadtestError(f"--mix: unknown task(s) {', '.join(unknown)} "
                                f"(available: {', '.join(sorted(pools))})")
        total = sum(mix.values())
        self.tasks = list(mix)
        self.weights = {t: mix[t] / total for t in self.tasks}
        self.pools = {t: pools[t] for t in self.tasks}
        self._cum: list[float] = []
        acc = 0.0
        for t in self.tasks:
            acc += self.weights[t]
            self._cum.append(acc)

    def sample(self, rng: random.Random) -> Row:
        u = rng.random()
        for task, c in zip(self.tasks, self._cum):
            if u < c:
                break
        else:
            task = self.tasks[-1]
        pool = self.pools[task]
        return pool[rng.randrange(len(pool))]

    def describe(self) -> dict:
        return {t: {"weight": round(self.weights[t], 6), "prompts": len(self.pools[t])} for t in self.tasks}


def build_workload(mix: str | None = None, data: str | Path | None = None,
                   tasks_dir: str | Path | None = None) -> Workload:
    """The CLI's entry point: load prompts (``data`` wins over ``tasks_dir``) and apply the mix."""
    pools = load_data_file(data) if data is not None else load_tasks_dir(tasks_dir or DEFAULT_TASKS_DIR)
    return Workload(pools, parse_mix(mix))
