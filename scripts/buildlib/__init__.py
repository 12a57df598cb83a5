"""The build-time library: what the image build's command-line tools do, apart from their command lines.

``scripts/fetch_models.py`` and ``scripts/install_nodes.py`` are thin command lines over this package. Both run
inside ``docker build`` without the worker's dependencies: the fetcher in a small tools venv (PyYAML, and for
``fetch``/``lock`` huggingface_hub with its httpx2), the installer with ComfyUI's own interpreter (standard library
only). So nothing here imports ``supervisor``, and a module imports no more than its command needs.

    common                settings from the environment, build secrets, output redaction, sizes
    manifest              models.yaml and custom_nodes.txt: parsing, validation, the in-place edit of ``lock``
    models/               the model fetcher (fetch_models.py)
        config            its settings and constants
        errors            how a fetch fails: reported, retryable, interrupted
        plan              what a fetch will do, decided without network; the --dry-run table
        progress          progress bars or periodic status lines
        streaming         a body written to disk while hashed; files hashed and copied
        hub               an entry resolved to a URL: Hugging Face Hub, Civitai, plain URL (imports httpx2)
        download          one entry made whole: present, cached, or downloaded with resume; verified, placed
        fetch             the ``fetch`` command: every target in parallel, then a summary
        lock              the ``lock`` command: fill sha256 and sizes, pin hf revisions
    nodes/                the node installer (install_nodes.py)
        config            its settings, its error and its output line
        procs             child processes (git, pip, ComfyUI) without build secrets
        install           clone, pip install and install.py per pack; the ``install_nodes`` command
        import_check      ComfyUI started to prove that each pack imports

The Dockerfile copies ``common``, ``manifest`` and the one subpackage each stage runs, so changing the node
installer does not run the model fetch again (and the other way round).
"""
