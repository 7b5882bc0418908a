"""`python -m cli ...` runs the `mergealign` command."""

from cli.main import main

main()
