"""ComfyUI as both parts of the worker see it: its protocol client, its status, the node classes a workflow needs.

It sits below the supervision (which owns the ComfyUI process) and the job engine (which sends it work), so that
neither reaches into the other.
"""
