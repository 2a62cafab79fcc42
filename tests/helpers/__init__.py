"""What the tests share besides fixtures (those live in tests/conftest.py).

- `helpers.paths`: where the committed test data is (`ROOT`, `ASSETS`, `FIXTURES`, `asset_path`) and
  `needs_reference` (skip naming the extra when an official implementation is absent);
- `helpers.cli`: running `python -m ...` as a user would, one-line errors, folder snapshots;
- `helpers.threads`: `single_thread`, the one-intra-op-thread setting every test runs under;
- `helpers.sam`, `helpers.florence`: the official models' counterparts and tiny models of each family.
- `helpers.app`: a tiny seeded app served on 127.0.0.1 in a thread, and plain JSON requests to it.

Tests import them as `from helpers.cli import ...` (tests/ is on sys.path, as pytest puts it);
`bench/` puts tests/ on sys.path the same way.
"""
