"""CLI command groups. Each module exposes `register(app)`; flows/cli.py assembles them."""
