"""The two tasks a D2LLM student scores: one definition for the student, trainer and plugin.

``asymmetric``: a query against passages (search). ``symmetric``: two texts of the same kind
(sentence similarity). The IEM has one projection per task and the teacher one prompt.
"""

from __future__ import annotations

from typing import Literal, get_args

Task = Literal["asymmetric", "symmetric"]
TASKS: tuple[Task, ...] = get_args(Task)
