"""mozrest-relay: relays reservation states from an RMS outbox table to Mozrest's POS webhooks."""

__version__ = "0.1.0"
