"""Zero-shot evaluation through lm-evaluation-harness's Python API (optional extra: ``pip install lm-eval``).

The harness loads its task data itself (from the Hugging Face hub or its cache); ``include_path`` adds
task directories of your own, e.g. small local tasks for offline checks.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

# The paper's zero-shot suite (Table 3): language modelling and common-sense reasoning.
PAPER_TASKS = ("wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
               "social_iqa", "boolq")
# The number the paper reports for each task (metric name as the harness spells it).
PAPER_METRICS = {
    "wikitext": ("word_perplexity",),
    "lambada_openai": ("perplexity", "acc"),
    "piqa": ("acc",),
    "hellaswag": ("acc_norm",),
    "winogrande": ("acc",),
    "arc_easy": ("acc",),
    "arc_challenge": ("acc_norm",),
    "social_iqa": ("acc",),
    "boolq": ("acc",),
}
DEFAULT_MAX_LENGTH = 2048


def require_lm_eval():
    """Import lm_eval or explain how to install it."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (needs accelerate)
    except ImportError as err:
        raise ImportError("evaluation needs lm-evaluation-harness with its Hugging Face backend: "
                          "pip install 'lm-eval[hf]' (or pip install 'palimpsa[eval]')") from err
    import lm_eval

    return lm_eval


def harness_model(model, tokenizer, batch_size: Union[int, str] = 1, max_length: int = DEFAULT_MAX_LENGTH):
    """Wrap a loaded causal LM and its tokenizer as the harness's ``HFLM`` (the model keeps its device/dtype).

    Recurrent models have no position limit; ``max_length`` is the window of rolling log-likelihoods.
    """
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                max_length=max_length)


def evaluate_with_harness(model, tokenizer, tasks: Sequence[str] = PAPER_TASKS, *,
                          include_path: Optional[Union[str, List[str]]] = None, num_fewshot: Optional[int] = None,
                          limit: Optional[Union[int, float]] = None, batch_size: Union[int, str] = 1,
                          max_length: int = DEFAULT_MAX_LENGTH, seed: int = 1234,
                          include_defaults: bool = True) -> Dict[str, Any]:
    """Run ``tasks`` and return the harness's results dict (``results``, ``versions``, ``n-shot``, ...).

    Args:
        model: a causal LM (``PreTrainedModel``), already on its device.
        tokenizer: its tokenizer.
        tasks: harness task names (default: the paper's suite).
        include_path: directory (or list) of extra task YAML files.
        num_fewshot: few-shot examples (None: the task's default, 0 for the paper's tasks).
        limit: evaluate only this many (int) or this fraction (float) of each task's examples.
        batch_size: harness batch size (int or "auto").
        max_length: context window of the harness (rolling log-likelihood windows).
        seed: the harness's random, numpy and torch seeds.
        include_defaults: also index the harness's own tasks (slow: thousands of files); with False only
            ``include_path`` tasks exist.  When every task is found in ``include_path`` they are skipped anyway.
    """
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        paths = [include_path] if isinstance(include_path, str) else list(include_path)
        missing = [p for p in paths if not os.path.isdir(p)]
        if missing:
            raise ValueError(f"include_path must name existing directories, missing: {missing}")
    task_manager = None
    if include_path is not None:
        task_manager = TaskManager(include_path=include_path, include_defaults=False)
        if include_defaults and not set(tasks) <= set(task_manager.all_tasks):
            task_manager = None
    if task_manager is None:
        task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks: {unknown}")
    results = lm_eval.simple_evaluate(
        model=harness_model(model, tokenizer, batch_size, max_length), tasks=list(tasks),
        num_fewshot=num_fewshot, limit=limit, task_manager=task_manager, log_samples=False,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    if results is None:  # only non-zero ranks of a distributed harness run get None
        raise RuntimeError("lm-eval returned no results")
    return results
