"""Vendor-neutral emulator core shared by the vendor-style sandboxes (see USER_API.md)."""

from connectors.sandbox.app import new_sandbox_app
from connectors.sandbox.errors import SandboxError
from connectors.sandbox.files import FileStore, StoredFile
from connectors.sandbox.kernel import (
    MAX_TEXT_BYTES,
    Conversation,
    EventPublisher,
    External,
    FileRules,
    Kernel,
    Location,
    Message,
    Reaction,
    SandboxUser,
)
from connectors.sandbox.webtools import KERNEL_KEY

__all__ = [
    "KERNEL_KEY",
    "MAX_TEXT_BYTES",
    "Conversation",
    "EventPublisher",
    "External",
    "FileRules",
    "FileStore",
    "Kernel",
    "Location",
    "Message",
    "Reaction",
    "SandboxError",
    "SandboxUser",
    "StoredFile",
    "new_sandbox_app",
]
