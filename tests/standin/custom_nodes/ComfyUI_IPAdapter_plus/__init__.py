"""Stand-in for cubiq's ComfyUI_IPAdapter_plus (9d076a3): same class names, schemas and folder key.

Like the real pack it registers the ``ipadapter`` model folder when imported (keeping paths that
extra_model_paths.yaml already gave that key), and its nodes are loaded the way ComfyUI loads any pack.
Results are synthetic (see IPAdapterPlus.py).
"""

from .IPAdapterPlus import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
