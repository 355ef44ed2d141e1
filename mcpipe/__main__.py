"""``python -m mcpipe`` (and ``torchrun -m mcpipe``) runs the CLI."""

from mcpipe.cli import main

main()
