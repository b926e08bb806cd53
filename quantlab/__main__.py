"""`python -m quantlab` runs the CLI."""

from quantlab.cli import main

main()
