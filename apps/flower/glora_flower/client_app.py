"""The glora ClientApp (see :mod:`glora.flower.client`)."""

from glora.flower.client import build_client_app

app = build_client_app()
