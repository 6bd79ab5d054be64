"""The WSGI entry point for gunicorn: ``gunicorn -c serving/gunicorn.conf.py serving.wsgi:app``.

gunicorn's master imports this module (``preload_app``) and so loads the model once; the workers
are forks of it. ``kill -HUP <master>`` reloads MODEL_DIR in the master (keeping the model it has
if the directory is not a valid model) and starts new workers with the result (docs/serving.md).
"""

from __future__ import annotations

import logging

from serving.app import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = create_app()
