"""``python -m supervisor``: the image's entrypoint. See supervisor.main."""

from supervisor.main import main

raise SystemExit(main())
