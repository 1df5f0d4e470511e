"""The one place that knows how the installed ``transformers`` names a model's decoding cache.

``transformers`` 5.17 calls it ``past_key_values`` (``cache_params`` for Mamba-style models): that is the
output field of ``BaseModelOutputWithPast`` / ``CausalLMOutputWithPast`` and the keyword ``generate()`` passes to
``forward``.  Later 5.x releases call it ``cache`` everywhere: the output dataclasses declare a ``cache`` field
(the old names survive only as deprecated, warning aliases), ``generate()`` passes ``cache=`` to ``forward`` and
reads ``outputs["cache"]`` to carry the state to the next step.

The models here therefore:

* subclass transformers' own output dataclasses (so the cache field has the installed name,
  :data:`CACHE_FIELD`), and build every output through :func:`cache_output_kwargs`;
* read a returned cache with :func:`output_cache`;
* accept all three keywords in ``forward`` and merge them with :func:`resolve_cache_kwarg`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Dict, Optional

from transformers.modeling_outputs import CausalLMOutputWithPast

#: the name of the cache field of transformers' model outputs: "cache" (newer 5.x) or "past_key_values" (5.17)
CACHE_FIELD: str = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"

#: every keyword under which a caller (or ``generate()``, in any supported version) may pass the cache
CACHE_KWARGS = ("cache", "past_key_values", "cache_params")


def cache_output_kwargs(cache: Any) -> Dict[str, Any]:
    """``{CACHE_FIELD: cache}``: the keyword that stores ``cache`` in a model output without a deprecation warning."""
    return {CACHE_FIELD: cache}


def output_cache(output: Any) -> Any:
    """The cache of a model output (None when it has none), under whichever name this ``transformers`` uses."""
    return getattr(output, CACHE_FIELD, None)


def resolve_cache_kwarg(cache: Any = None, past_key_values: Any = None, cache_params: Any = None) -> Optional[Any]:
    """The one cache among ``cache`` / ``past_key_values`` / ``cache_params`` (None when none is given).

    Raises ValueError if two different objects are given.
    """
    given = [c for c in (cache, past_key_values, cache_params) if c is not None]
    if any(c is not given[0] for c in given[1:]):
        raise ValueError("pass the cache once: cache, past_key_values and cache_params name the same argument")
    return given[0] if given else None
