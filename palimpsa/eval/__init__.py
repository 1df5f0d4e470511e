"""Evaluation: lm-evaluation-harness tasks (optional extra) and loss by token position.

    from palimpsa.eval import evaluate_with_harness, per_position_loss
"""

from palimpsa.eval.harness import LOCAL_TASKS, PAPER_TASKS, evaluate_with_harness
from palimpsa.eval.position_loss import per_position_loss, plot_position_loss
from palimpsa.eval.report import markdown_summary, write_report

__all__ = ["LOCAL_TASKS", "PAPER_TASKS", "evaluate_with_harness", "per_position_loss", "plot_position_loss",
           "markdown_summary", "write_report"]
