"""The browser page served at ``/`` and its assets under ``/static/`` (package data)."""
