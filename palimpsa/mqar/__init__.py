"""Multi-query associative recall (MQAR): Zoology-compatible data, the model zoo, training, sweeps, reports.

``palimpsa mqar`` (see :mod:`palimpsa.mqar.cli`) runs a preset sweep; everything it does is available here.
"""

from palimpsa.mqar.data import make_splits, multiquery_ar
from palimpsa.mqar.models import MODEL_NAMES, MQARModel, MQARModelConfig, recurrent_state_bytes
from palimpsa.mqar.presets import PRESETS, preset_grid
from palimpsa.mqar.report import format_table, summarize, variance_auroc, write_report
from palimpsa.mqar.sweep import SweepGrid, run_sweep
from palimpsa.mqar.train import RunConfig, train_run

__all__ = [
    "multiquery_ar", "make_splits", "MODEL_NAMES", "MQARModel", "MQARModelConfig", "recurrent_state_bytes",
    "PRESETS", "preset_grid", "format_table", "summarize", "variance_auroc", "write_report", "SweepGrid",
    "run_sweep", "RunConfig", "train_run",
]
