"""Vendor-neutral emulator core shared by the vendor-style sandboxes (see USER_API.md)."""

from connectors.sandbox.app import new_sandbox_app
from connectors.sandbox.kernel import (
    MAX_TEXT_BYTES,
    Conversation,
    EventPublisher,
    External,
    Kernel,
    Message,
    SandboxError,
    SandboxUser,
)
from connectors.sandbox.webtools import KERNEL_KEY

__all__ = [
    "KERNEL_KEY",
    "MAX_TEXT_BYTES",
    "Conversation",
    "EventPublisher",
    "External",
    "Kernel",
    "Message",
    "SandboxError",
    "SandboxUser",
    "new_sandbox_app",
]
