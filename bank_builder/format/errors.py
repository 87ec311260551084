"""What can be wrong with a bank on storage, as exception types the CLI and the service map to messages.

BankError (a ValueError, so a caller's `except ValueError` still sees it)
  BankMismatchError      the bank is fine but not what was asked for: no such version, no index yet, built
                         with another encoder or other options. The user fixes the request.
    BankNotFoundError      no published version at that URI (nothing stored there, or no CURRENT yet).
    BankNotIndexedError    no version of the bank that was asked for has an index yet.
    ConcurrentUpdateError  CURRENT moved between a writer's plan and its publish.
  BankFormatError        the bank's objects are malformed, of another format, or name objects outside it.
    UnsafeNameError        an object name that would resolve outside the bank.
    IndexCorruptError      an object does not match the checksum or shape its manifest records.
  StorageError           a storage call failed (the store kept failing, or refused); the bank may be fine.
"""

from __future__ import annotations


class BankError(ValueError):
    """The bank on storage cannot serve the request; the message says why and what to do."""


class BankMismatchError(BankError):
    """A build or reader disagrees with the bank (missing version or index, other encoder or options)."""


class BankNotFoundError(BankMismatchError):
    """No published version at the bank's URI: nothing is stored there (a wrong path?), or no CURRENT yet."""


class BankNotIndexedError(BankMismatchError):
    """The version asked for (or every version, when serving CURRENT) has no index yet: run `refbank index`."""


class ConcurrentUpdateError(BankMismatchError):
    """CURRENT moved between a writer's plan and its publish: another writer published first."""


class BankFormatError(BankError):
    """The bank's objects are malformed, of a format this refbank does not read, or tampered with."""


class UnsafeNameError(BankFormatError):
    """An object name that would resolve outside the bank's root (absolute, '..', another scheme)."""


class IndexCorruptError(BankFormatError):
    """An object on storage does not match the checksum or shape its manifest records."""


class StorageError(BankError):
    """A storage call failed: the store refused it (access denied, no such bucket, a full disk) or kept failing
    (5xx, throttling, resets) through every retry. `operation` ("read", "write", "list", ...), `url` (the object
    or prefix) and `cause` (one line: status and code, or the exception) say which; the bank itself may be fine.
    `reason` sorts it for whoever answers the user: "no_credentials", "endpoint_unreachable" (the connection
    failed on every try), "access_denied" (403), or "unavailable" (anything else)."""

    REASONS = ("no_credentials", "endpoint_unreachable", "access_denied", "unavailable")

    def __init__(self, operation: str, url: str, cause: str, reason: str = "unavailable") -> None:
        # args rebuild it when pickled (Ray sends errors between processes)
        super().__init__(operation, url, cause, reason)
        self.operation, self.url, self.cause, self.reason = operation, url, cause, reason

    def __str__(self) -> str:
        return (f"storage {self.operation} of {self.url} failed: {self.cause}. Check that the store is reachable "
                "with these credentials, then run the command again")
