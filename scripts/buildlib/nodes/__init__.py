"""The node installer behind ``scripts/install_nodes.py``: each pack of custom_nodes.txt cloned at its pinned
commit, its requirements installed into ComfyUI's interpreter, then every pack proven to import. Standard library
only: it runs with ComfyUI's interpreter, which has none of the worker's dependencies."""
