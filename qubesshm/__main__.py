"""``python -m qubesshm`` is the ``qubesshm`` command."""

from .cli import main

raise SystemExit(main())
