"""Process reward models in VisualPRM's form (arXiv 2503.10291): the step prompt and its scores (prompt.py,
score.py), step-labelled training rows from the synthetic world (data.py), best-of-N selection (select.py) and a
VisualProcessBench-style step evaluation (bench.py)."""

from .prompt import PRM_SYSTEM_PROMPT, split_steps
from .score import PRM, aggregate
from .select import BestOf, best_of

__all__ = ["PRM", "PRM_SYSTEM_PROMPT", "BestOf", "aggregate", "best_of", "split_steps"]
