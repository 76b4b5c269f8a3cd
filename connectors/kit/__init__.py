"""Vendor plumbing every connector may share, written once: signed webhooks (``signing``), a
retry policy (``backoff``), a polled event feed (``feed``), a sandbox's "deliver until 2xx"
pusher (``pusher``), remote-id rules (``ids``), Markdown escaping (``markdown``) and stopping
tasks (``tasks``).

Part of the connector contract: it imports nothing from ``bridge/``, so a third-party
connector uses it as the bundled ones do, and the bridge may import it too.
"""
