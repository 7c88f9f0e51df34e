"""Tasks: how models are called, the task loss, evaluation over a whole split and per-sample records.

A task is a registered component (`task: {name: classification, label_smoothing: 0.1}`), so the
engine, the records and the CLI never name a task or a metric: classification, retrieval,
detection and language modelling differ only here.
"""

from padkd.tasks.base import TASKS, Evaluator, Task
from padkd.tasks.classification import Classification
from padkd.tasks.detection import Detection
from padkd.tasks.language import LanguageModeling
from padkd.tasks.retrieval import Retrieval

__all__ = ["TASKS", "Task", "Evaluator", "Classification", "Detection", "Retrieval", "LanguageModeling"]
