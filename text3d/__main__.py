"""`python -m text3d` runs the CLI."""

from text3d.cli import main

main()
