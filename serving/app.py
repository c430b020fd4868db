"""ASGI entry point for process managers: ``uvicorn serving.app:app --http serving.app:http``.

Reads the models folder from LHASH_MODELS_DIR (default ``models``) and the serving section of
LHASH_PARAMS (default ``params.yaml``). ``lhash serve`` does the same from the command line.
``http`` is the connection guard (``service.guarded_protocol``: connection count, header size,
header and request deadlines) configured from the same params; without it uvicorn serves the
app unguarded, and the app logs so at its first request.
"""

import os

from lifelong_hashing.config import load_params
from lifelong_hashing.inference.service import create_app, guarded_protocol

_params = load_params(os.environ.get("LHASH_PARAMS", "params.yaml"))
app = create_app(os.environ.get("LHASH_MODELS_DIR", _params.export.models_dir), _params.serving,
                 photos=_params.photos, deletions=_params.pipeline.deletions)
http = guarded_protocol(_params.serving)
