"""Kennel studio: the local pipeline page (`kennel studio`).

A stdlib HTTP server (`local.studio.server`) answers a small JSON API built from the state folder
by `local.studio.views`, and serves one static page (`static/`) that draws the DAG, follows runs,
shows step details, and approves or rejects model packages through `local.deployment` (the code
`kennel approve` / `kennel reject` run).
"""

from local.studio.server import StudioServer, serve

__all__ = ["StudioServer", "serve"]
