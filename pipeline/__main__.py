"""`python -m pipeline ...` is the `kennel` command."""

from pipeline.cli import main

raise SystemExit(main())
