"""Where the local runtime keeps its state: `.kennel/` in the current folder, or $KENNEL_HOME.

Layout under the home folder (all of it plain files, readable by hand and by the web page):

    s3/<bucket>/<key>                      the local object store (s3:// URIs)
    executions/<id>/execution.json         one pipeline execution (status, parameters, times)
    executions/<id>/definition.json        the definition it runs (what was upserted)
    executions/<id>/steps/<step>.json      one record per step (status, properties, log path)
    executions/<id>/jobs/<job-name>/       a job folder: the container layout re-rooted, log.txt
    cache/<pipeline>/<step>/<key>.json     step cache entries
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_VARIABLE = "KENNEL_HOME"
DEFAULT_HOME_NAME = ".kennel"


def resolve_home(explicit: Path | str | None = None) -> Path:
    """The state folder: `explicit` if given, else $KENNEL_HOME, else ./.kennel (absolute)."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    from_environment = os.environ.get(HOME_VARIABLE)
    if from_environment:
        return Path(from_environment).expanduser().resolve()
    return (Path.cwd() / DEFAULT_HOME_NAME).resolve()


def store_root(home: Path) -> Path:
    return home / "s3"


def executions_root(home: Path) -> Path:
    return home / "executions"


def cache_root(home: Path) -> Path:
    return home / "cache"
