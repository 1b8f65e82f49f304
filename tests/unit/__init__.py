"""Fast tests: no worker, no broker server, one module per module of the package."""
