"""Thin Flower app folder: the ServerApp and ClientApp come from the installed ``glora``."""
