"""Zero-shot evaluation through lm-evaluation-harness's Python API (optional extra: ``pip install lm-eval``).

The harness loads its task data itself (from the Hugging Face hub or its cache); ``include_path`` adds
task directories of your own.  Two small tasks ship with the package (``palimpsa/eval/tasks``, the suite
``local``) and run offline; the paper's suite (``paper``) downloads its data from the hub.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
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
# Small tasks shipped with the package: read from local JSON-lines files, so they run without network.
LOCAL_TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
LOCAL_TASKS = ("palimpsa_tiny_choice", "palimpsa_tiny_rolling")
# Names that stand for several tasks on the command line.
TASK_SUITES = {"local": LOCAL_TASKS, "paper": PAPER_TASKS}


class HubUnreachableError(ConnectionError):
    """Tasks need data from the Hugging Face hub, and the hub cannot be reached."""


def expand_tasks(names: Sequence[str]) -> List[str]:
    """Task names with the suites ``local`` and ``paper`` expanded (order kept, duplicates dropped);
    ``["none"]`` gives [] (no harness run)."""
    if isinstance(names, str):
        raise ValueError(f"tasks must be a list of task names, got the string {names!r}")
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"--tasks none skips the harness and takes no other task, got {list(names)}")
        return []
    tasks: List[str] = []
    for name in names:
        for task in TASK_SUITES.get(name, (name,)):
            if task not in tasks:
                tasks.append(task)
    return tasks


def _hub_offline() -> bool:
    """True when the user told the Hugging Face libraries to stay offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers an HTTP request within ``timeout`` seconds (proxies honoured)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered
    except (OSError, ValueError):
        return False
    return True


def check_task_data_reachable(tasks: Sequence[str], local_tasks: Sequence[str]) -> None:
    """Raise :class:`HubUnreachableError` (one line saying what to do) when some of ``tasks`` are not in
    ``local_tasks`` (those of the include paths, taken to read local files) and the hub cannot be reached; with
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set the harness reads its cache instead."""
    remote = [t for t in tasks if t not in local_tasks]
    if not remote or _hub_offline() or hub_reachable():
        return
    raise HubUnreachableError(
        f"the tasks {remote} are not shipped here: the harness's tasks download their data from the Hugging Face "
        "hub, which cannot be reached. Connect to the internet, set HF_DATASETS_OFFLINE=1 if their data is "
        "already cached, or run the shipped offline tasks with --tasks local")


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


def task_manager_for(tasks: Sequence[str], include_path: Optional[Union[str, List[str]]] = None,
                     include_defaults: bool = True):
    """The harness's ``TaskManager`` that knows ``tasks``, after checking that their data can be had.

    ``include_path`` (a directory or a list) adds task YAML files; the shipped tasks' directory is always added.
    ``include_defaults`` also indexes the harness's own tasks (slow: thousands of files), unless every task is
    found in the include paths.  Raises ValueError for unknown tasks and :class:`HubUnreachableError` at once
    when a task needs the hub and the hub cannot be reached (unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say to
    use the cache).
    """
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [] if include_path is None else [include_path] if isinstance(include_path, str) else list(include_path)
    missing = [p for p in paths if not os.path.isdir(p)]
    if missing:
        raise ValueError(f"include_path must name existing directories, missing: {missing}")
    paths.append(LOCAL_TASKS_DIR)
    task_manager = TaskManager(include_path=paths, include_defaults=False)
    if include_defaults and not set(tasks) <= set(task_manager.all_tasks):
        # checked first: indexing the harness's own tasks takes seconds, and their data needs the hub
        check_task_data_reachable(tasks, task_manager.all_tasks)
        task_manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks: {unknown} (suites: {sorted(TASK_SUITES)})")
    return task_manager


def evaluate_with_harness(model, tokenizer, tasks: Sequence[str] = LOCAL_TASKS, *,
                          include_path: Optional[Union[str, List[str]]] = None, num_fewshot: Optional[int] = None,
                          limit: Optional[Union[int, float]] = None, batch_size: Union[int, str] = 1,
                          max_length: int = DEFAULT_MAX_LENGTH, seed: int = 1234,
                          include_defaults: bool = True, task_manager=None) -> Dict[str, Any]:
    """Run ``tasks`` and return the harness's results dict (``results``, ``versions``, ``n-shot``, ...).

    Args:
        model: a causal LM (``PreTrainedModel``), already on its device.
        tokenizer: its tokenizer.
        tasks: harness task names (default: the two shipped offline tasks, :data:`LOCAL_TASKS`).
        include_path, include_defaults: where the tasks are found (see :func:`task_manager_for`).
        num_fewshot: few-shot examples (None: the task's default, 0 for the paper's tasks).
        limit: evaluate only this many (int) or this fraction (float) of each task's examples.
        batch_size: harness batch size (int or "auto").
        max_length: context window of the harness (rolling log-likelihood windows).
        seed: the harness's random, numpy and torch seeds.
        task_manager: one from :func:`task_manager_for` (then ``include_path`` and ``include_defaults`` are
            not used); by default made here, with its checks, before any model call.
    """
    if task_manager is None:
        task_manager = task_manager_for(tasks, include_path, include_defaults)
    lm_eval = require_lm_eval()
    try:
        results = lm_eval.simple_evaluate(
            model=harness_model(model, tokenizer, batch_size, max_length), tasks=list(tasks),
            num_fewshot=num_fewshot, limit=limit, task_manager=task_manager, log_samples=False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except ConnectionError as err:  # e.g. offline mode and a task whose data is not cached
        raise HubUnreachableError(
            f"{err}: a task's data is neither cached nor downloadable. Run once with network (without "
            "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) to cache it, or run the shipped offline tasks with --tasks "
            "local") from err
    if results is None:  # only non-zero ranks of a distributed harness run get None
        raise RuntimeError("lm-eval returned no results")
    return results
