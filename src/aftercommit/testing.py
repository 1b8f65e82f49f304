"""Test helpers and the pytest plugin (registered through the ``pytest11`` entry point)."""
