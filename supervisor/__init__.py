"""The ComfyUI worker: supervises a ComfyUI process and serves jobs to it (RunPod or a self-hosted HTTP API)."""

__version__ = "0.1.0"
