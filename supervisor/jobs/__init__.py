"""The job engine: one request's life from its inputs through ComfyUI to its outputs, whichever door it came in by."""
