"""Choices for the demo's multiple-choice task: the output of every demo task on the prompt's input.

Imports the task definitions from the repository (run lm_eval with PYTHONPATH=. from the repo root).
"""
from zoo.tasks import TASKS


def with_choices(dataset):
    names = sorted(set(dataset["task"]))

    def add(doc):
        x = doc["prompt"].split(" ", 1)[1].removesuffix("=")
        choices = list(dict.fromkeys(TASKS[n].fn(x) for n in names))   # distinct, in a fixed order
        return {"choices": choices, "gold": choices.index(doc["target"])}

    return dataset.map(add)
