"""The Synthetic Visual World: seeded scenes, charts and clips with questions, split files and scoring.

The on-disk layout of a split is described in `writer.py`.
"""

from .scoring import score
from .tasks import TASKS, SynthItem, make_item
from .writer import generate_split

__all__ = ["TASKS", "SynthItem", "generate_split", "make_item", "score"]
