"""Shared test helpers (the stand-in ComfyUI harness lives in ``tests.helpers.standin``)."""
