"""``python -m supervisor``: the image's entrypoint. See supervisor.main."""

from .main import main

raise SystemExit(main())
