"""``python -m sisyphus`` is the same as the ``sisyphus`` command."""

from sisyphus.cli import main

raise SystemExit(main())
