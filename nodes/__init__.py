"""ComfyUI node adapters. Each module exports its own NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS; they are merged here."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}


def _register(module):
    NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(module.NODE_DISPLAY_NAME_MAPPINGS)

from . import embed as _embed, loaders as _loaders, plan as _plan, upscale as _upscale  # noqa: E402
from . import hidiffusion as _hidiffusion  # noqa: E402
from . import lora as _lora  # noqa: E402

_register(_loaders)
_register(_embed)
_register(_upscale)
_register(_plan)
_register(_hidiffusion)
_register(_lora)
