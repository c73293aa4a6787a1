"""Synthetic exact-match tasks. Every prompt is "<task word> <input>=" and the target is the output.

The tasks map the same kind of input to different outputs, so experts fine-tuned on one of them
overwrite the same weights in conflicting directions: merging them naively hurts.
"""
from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOWER = string.ascii_lowercase


def _shift(s: str, k: int = 3) -> str:
    return "".join(LOWER[(LOWER.index(c) + k) % 26] for c in s)


def _atbash(s: str) -> str:
    return "".join(LOWER[25 - LOWER.index(c)] for c in s)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    fn: Callable[[str], str]
    min_len: int = 4
    max_len: int = 8
    mixed_case: bool = False
    upper_input: bool = False

    def sample_input(self, rng: random.Random) -> str:
        n = rng.randint(self.min_len, self.max_len)
        s = "".join(rng.choice(LOWER) for _ in range(n))
        if self.upper_input:
            s = s.upper()
        elif self.mixed_case:
            s = "".join(c.upper() if rng.random() < 0.5 else c for c in s)
        return s

    def prompt(self, x: str) -> str:
        return f"{self.name} {x}="

    def example(self, rng: random.Random) -> dict:
        x = self.sample_input(rng)
        return {"prompt": self.prompt(x), "target": self.fn(x), "task": self.name}


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("reverse", "reverse the letters", lambda s: s[::-1]),
    Task("shift", "Caesar shift every letter by 3", _shift),
    Task("atbash", "mirror the alphabet (a<->z, b<->y)", _atbash),
    Task("swapcase", "swap upper and lower case", str.swapcase, mixed_case=True),
    Task("upper", "upper-case every letter", str.upper),
    Task("rotate", "move the first letter to the end", lambda s: s[1:] + s[:1]),
    Task("double", "write every letter twice", lambda s: "".join(c + c for c in s), max_len=6),
    Task("lower", "lower-case every letter", str.lower, upper_input=True),
]}

# generic pretraining: copy the input after a random instruction-like word
_PRETRAIN_WORDS = ["copy", "echo", "say", "repeat", "write", "print", "give", "show", "keep", "same"]


def pretrain_example(rng: random.Random) -> dict:
    word = rng.choice(_PRETRAIN_WORDS) if rng.random() < 0.5 else "".join(
        rng.choice(LOWER) for _ in range(rng.randint(3, 8)))
    n = rng.randint(3, 10)
    x = "".join(rng.choice(LOWER) for _ in range(n))
    if rng.random() < 0.3:
        x = "".join(c.upper() if rng.random() < 0.5 else c for c in x)
    return {"prompt": f"{word} {x}=", "target": x, "task": "copy"}


SPLIT_SIZES = {"train": 3000, "router": 200, "validation": 64, "test": 128}


def make_splits(task: Task, seed: int, sizes: dict[str, int] = SPLIT_SIZES) -> dict[str, list[dict]]:
    """Disjoint splits (no prompt in two splits), deterministic from ``seed``."""
    rng = random.Random(f"{seed}:{task.name}")
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split in ("test", "validation", "router", "train"):  # small, scored splits first
        rows: list[dict] = []
        tries = 0
        while len(rows) < sizes[split] and tries < sizes[split] * 50:
            tries += 1
            ex = task.example(rng)
            if ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                rows.append(ex)
        out[split] = rows
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
