"""Offline evaluation of KV-cache strategies: tasks, model bundles and the runner (docs/eval-contract.md).

from kvpress_mm.eval import get_task, load_model, evaluate
bundle = load_model("mini_llava")
result = evaluate(bundle, get_task("text_needle", n_samples=20), kvpress_mm.get_strategy("snapkv", budget=0.2))
result.to_dict()
"""

from .models import ModelBundle, list_models, load_model, model_options
from .runner import RunResult, evaluate, evaluate_many
from .sample import Sample
from .tasks import Task, get_task, list_tasks, register_task, task_fields

__all__ = [
    "ModelBundle",
    "RunResult",
    "Sample",
    "Task",
    "evaluate",
    "evaluate_many",
    "get_task",
    "list_models",
    "list_tasks",
    "load_model",
    "model_options",
    "register_task",
    "task_fields",
]
