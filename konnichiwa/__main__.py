"""`python -m konnichiwa` does what the `konnichiwa` command does."""

from konnichiwa.cli import main

raise SystemExit(main())
