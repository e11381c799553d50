"""Evaluation: VLMEvalKit TSVs and the Synthetic Visual World split, answered through the generation engine.

`tsv_task(path)` / `SyntheticTask(folder)` build a task, `evaluate(model, task, out_dir)` answers and scores it
(see runner.py for the output files); tasks, synthetic, items, tsv, prompts, extract, circular and metrics
hold the rules.
"""

from .runner import evaluate, synthetic_split
from .synthetic import SyntheticTask, synth_table
from .tasks import MCQTask, VQATask, tsv_task

__all__ = ["MCQTask", "SyntheticTask", "VQATask", "evaluate", "synth_table", "synthetic_split", "tsv_task"]
