"""Latitude: one web application, several regions of the planet."""

__version__ = "0.1.0"
