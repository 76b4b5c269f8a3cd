"""The operators\x27 console: an admin room (a DM with the bridge bot), its commands and alerts."""
