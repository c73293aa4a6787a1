"""Choices for the demo's multiple-choice task: the output of every demo task on the prompt's input.

Imports the task definitions from the repository (run lm_eval with PYTHONPATH=. from the repo root).
"""
from zoo.tasks import TASKS


def _outputs(names: list[str], x: str) -> list[str]:
    out = []
    for n in names:
        try:
            out.append(TASKS[n].fn(x))
        except ValueError:   # the letter-table tasks take lower-case input only
            continue
    return list(dict.fromkeys(out))   # distinct, in a fixed order


def with_choices(dataset):
    names = sorted(set(dataset["task"]))

    def add(doc):
        choices = _outputs(names, doc["prompt"].split(" ", 1)[1].removesuffix("="))
        return {"choices": choices, "gold": choices.index(doc["target"])}

    return dataset.map(add)
