"""The model fetcher behind ``scripts/fetch_models.py``: every file of models.yaml downloaded, resumed, verified
against its SHA-256 and placed. ``config``, ``errors``, ``plan`` and ``streaming`` need only the standard library
(and PyYAML through the manifest); ``hub``, ``download``, ``fetch`` and ``lock`` load the download stack
(huggingface_hub, httpx2), so ``fetch_models.py check`` runs without it."""
