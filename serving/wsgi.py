"""The WSGI entry point for gunicorn: ``gunicorn -c serving/gunicorn.conf.py serving.wsgi:app``.

Each worker imports this module and so loads the model once; ``kill -HUP <master>`` starts new
workers, which load whatever MODEL_DIR points to then (see docs/serving.md).
"""

from __future__ import annotations

import logging

from serving.app import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = create_app()
