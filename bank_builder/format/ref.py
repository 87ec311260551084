"""A bank reference: where a bank lives (URI + fsspec options), and the only way object URLs are made from it.

Every name that reaches storage through `BankRef.url` is checked: relative, '/'-separated components of
letters, digits, '.', '_' and '-', none of them '.' or '..'. Names read from a manifest (part names, index ids,
object names) therefore always resolve inside the bank's root, however the manifest was written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import fsspec

from bank_builder.format import storage
from bank_builder.format.errors import UnsafeNameError

_COMPONENT = re.compile(r"[A-Za-z0-9._-]+")


def check_name(name: str) -> str:
    """`name` if it is a safe relative object name inside a bank, else UnsafeNameError naming it."""
    parts = name.split("/") if isinstance(name, str) else [None]
    if not parts or any(p is None or p in (".", "..") or not _COMPONENT.fullmatch(p) for p in parts):
        raise UnsafeNameError(f"object name {name!r} does not stay inside the bank (names are relative paths of "
                              "letters, digits, '.', '_' and '-', without '..'); the manifest naming it was not "
                              "written by refbank or was tampered with")
    return name


@dataclass(frozen=True)
class BankRef:
    """A bank's URI (local directory, file://, s3://bucket/prefix, any fsspec URL) and the fsspec options to
    reach it (endpoint_url, credentials). Hashable by URI and options; options never go into a manifest."""

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise ValueError(f"a bank URI must be a non-empty string, got {self.uri!r}")
        object.__setattr__(self, "uri", self.uri.rstrip("/") or "/")
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    def url(self, *names: str) -> str:
        """The URL of an object under the bank; every name is checked by `check_name`."""
        return storage.join(self.uri, *(check_name(n) for n in names))

    def fs(self, *names: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, in-filesystem path) of `url(*names)`; the filesystem is resolved once per BankRef."""
        return self._filesystem, self._filesystem._strip_protocol(self.url(*names))

    @cached_property
    def _filesystem(self) -> fsspec.AbstractFileSystem:
        # fsspec tokenizes the options (an md5) on every lookup: a hot path asking per list would pay it per list
        return storage.url_to_fs(self.uri, self.storage_options)[0]

    def __str__(self) -> str:
        return self.uri
