"""The `mergealign` command line: a static command table (cli.main) and one module per command group."""
