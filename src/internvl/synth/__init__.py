"""The Synthetic Visual World: seeded scenes, charts and clips with questions, and split files.

The on-disk layout of a split is described in `writer.py`; its scoring is the benchmark's, in eval/synth_scoring.py.
"""

from .tasks import TASKS, SynthItem, make_item
from .writer import generate_split

__all__ = ["TASKS", "SynthItem", "generate_split", "make_item"]
