"""The glora ServerApp (see :mod:`glora.flower.server`)."""

from glora.flower.server import build_server_app

app = build_server_app()
