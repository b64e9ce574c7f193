"""The OpenAPI document of the REST API, as committed in docs/openapi.json.

``python -m ember.api.openapi > docs/openapi.json`` regenerates it; a test
keeps the committed file equal to what the daemon serves.
"""

from __future__ import annotations

import json
import sys
from typing import Any, cast


def document() -> dict[str, Any]:
    from ember.api.app import create_app
    from ember.daemon.manager import Manager

    # Rendering the routes never touches the manager.
    return create_app(cast(Manager, None)).openapi()


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
