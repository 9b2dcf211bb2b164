"""A run's training curves, logged with DVCLive (``runs/<run>/dvclive/``, the layout in
:mod:`pipeline.core.curves`): ``train/<name>`` at each logged step, ``val/<name>`` at each
validation, the step being the iteration.

DVCLive is used as a logger only: no ``dvc.yaml`` of its own (the project's declares the
curves as plots of the training stages) and no experiment saved at the end (``dvc exp run``
does that for a whole pipeline). Inside ``dvc exp run`` its editor integrations see each step.
A resumed run opens the folder with ``resume=True`` after :func:`pipeline.core.curves.cut_curves`
cut it back to the resumed iteration (:func:`pipeline.training.resume.prepare_run_dir`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from dvclive import Live

# DVCLive says at INFO which experiment it logs to; the run's own lines say what matters
logging.getLogger("dvclive").setLevel(logging.WARNING)


class CurveLog:
    """DVCLive's ``Live`` over one run's curves folder; use as a context manager."""

    def __init__(self, live_dir: Path) -> None:
        self.live = Live(dir=str(live_dir), resume=True, save_dvc_exp=False, dvcyaml=False,
                         report=None)

    def log(self, group: str, *, step: int, values: Mapping[str, float]) -> None:
        """One row of each curve ``<group>/<name>`` at ``step`` (the iteration)."""
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(f"{group}/{name}", float(value))
        self.live.next_step()  # writes the summary and signals DVC's editor integrations

    def close(self) -> None:
        self.live.end()

    def __enter__(self) -> "CurveLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
