"""Kept for the import path that model cards written before the package was split print
(`from deltacli.store import read_delta`): the delta folder lives in `storage.delta_folder`."""

from deltacli.storage.delta_folder import read_delta

__all__ = ["read_delta"]
