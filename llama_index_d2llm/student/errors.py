"""Errors a user can act on. Each message says what is wrong and how to fix it."""


class D2LLMError(Exception):
    """Base class of the package's own errors."""


class CheckpointError(D2LLMError, ValueError):
    """A student directory is missing, corrupt or written by another version."""


class StudentMismatchError(D2LLMError, ValueError):
    """Stored vectors were made by another student than the one asked to score them."""


class DeviceError(D2LLMError, RuntimeError):
    """A device was asked for that this machine does not have."""


class RemoteCodeError(D2LLMError, ValueError):
    """A model needs its own Python code to load, and the caller did not allow it."""


class UnsafeDirectoryError(D2LLMError, ValueError):
    """Writing where asked would delete or replace files the package did not write."""
