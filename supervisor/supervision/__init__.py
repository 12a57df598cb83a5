"""The supervision of ComfyUI: the only part that starts, watches, restarts and stops the ComfyUI process."""
