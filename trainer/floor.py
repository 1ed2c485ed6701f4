"""The floor: a distilled state is kept only when it ranks above the starting point on dev,
beyond noise.

The untrained student is the starting encoder (``student/pooling.py``), so it is evaluated on
dev like every later state and is the first "best". A later state replaces the best only when
its dev figure is higher and its gain over the start, paired over the dev queries, clears the
same one-sided rule the fusion weights use:

    d_q = dev_q(state) - dev_q(start)        keep the state iff mean(d) > 1.645 * se(d)

A plain "higher mean" is not enough: on SciFact, a documents-only student whose dev figure
(70 generated queries) rose by 0.009 ranked the 809 real claims 0.005 below the encoder it
started from. When nothing clears the rule, the starting weights are what is written, and
the log says so.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

from llama_index_d2llm.trainer.dev_ranking import GAIN_Z

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FloorCheck:
    """A state's dev gain over the starting point, paired over the dev queries."""

    gain: float
    standard_error: float
    queries: int

    @property
    def clears(self) -> bool:
        return self.gain > GAIN_Z * self.standard_error

    def describe(self) -> str:
        return f"{self.gain:+.4f} +- {self.standard_error:.4f} over {self.queries} dev queries"


def compare_to_start(start: dict[str, float] | None, state: dict[str, float] | None
                     ) -> FloorCheck | None:
    """The paired gain of ``state`` over ``start`` (each dev query's figure), or ``None``
    when either is unknown (a dev set without per-query figures: then the mean decides)."""
    if not start or not state:
        return None
    queries = [q for q in start if q in state]
    if len(queries) < 2:
        return None
    diffs = [state[q] - start[q] for q in queries]
    return FloorCheck(statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5,
                      len(diffs))


def report(metric: str, start: float | None, best: float | None, kept_start: bool,
           check: FloorCheck | None, best_trained: float | None) -> None:
    """Say what distillation bought over the starting point, and when it bought nothing."""
    if start is None or best is None:
        return
    if kept_start:
        trained = "n/a" if best_trained is None else f"{best_trained:.4f}"
        logger.warning(
            "no distilled state ranked above the starting point on dev beyond noise (%s: "
            "start %.4f, best distilled %s): the student keeps its starting weights, i.e. the "
            "untrained encoder with the rescoring chosen on dev", metric, start, trained)
    else:
        gain = f" ({check.describe()})" if check is not None else ""
        logger.info("dev %s: starting point %.4f -> distilled %.4f%s", metric, start, best,
                    gain)
