"""Numbered SQL migrations (``V<N>__<name>.sql``), applied in order at start-up by the SQLite
backend (:mod:`chat.storage.sqlite`)."""
