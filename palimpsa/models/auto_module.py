"""Saved models that transformers' Auto classes can load without ``import palimpsa``.

transformers knows classes from outside its own package through a config's ``auto_map`` (Auto class -> module
in the model's folder . class).  ``save_pretrained`` of the configs here writes that map and, beside
config.json, :data:`MODULE_NAME`.py: a module that only imports the classes from the installed palimpsa package
(no model code is copied).  Then, in a fresh interpreter::

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

works; without ``trust_remote_code=True`` transformers asks for it (the module runs ``import palimpsa``).
After ``import palimpsa`` the Auto classes know the models and the map is not used.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict

MODULE_NAME = "palimpsa_auto"

MODULE_TEXT = f'''"""Lets transformers' Auto classes load this model without `import palimpsa`:
AutoModelForCausalLM.from_pretrained(this_folder, trust_remote_code=True).

It holds no model code: the classes come from the palimpsa package, which must be installed,
as they do after `import palimpsa`.  Written by palimpsa's save_pretrained ({__name__}).
"""

from palimpsa.models import (  # noqa: F401
    GatedDeltaNetForCausalLM,
    GatedDeltaNetLMConfig,
    MetaMamba2Config,
    MetaMamba2ForCausalLM,
    MetaMamba2Model,
    PalimpsaConfig,
    PalimpsaForCausalLM,
    PalimpsaModel,
)
'''


def write_auto_module(save_directory: str | os.PathLike) -> str:
    """Write ``<save_directory>/palimpsa_auto.py`` atomically (creating the folder); return its path."""
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, MODULE_NAME + ".py")
    fd, temporary = tempfile.mkstemp(dir=save_directory, prefix=f".{MODULE_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(MODULE_TEXT)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


class SavesAutoMap:
    """Mixin for a ``PretrainedConfig``: ``save_pretrained`` also writes ``auto_map`` and the import module.

    ``auto_classes`` maps transformers' Auto class names to the names of palimpsa.models classes.
    """

    auto_classes: Dict[str, str] = {}

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory}")
        write_auto_module(save_directory)
        self.auto_map = {auto: f"{MODULE_NAME}.{name}" for auto, name in self.auto_classes.items()}
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
