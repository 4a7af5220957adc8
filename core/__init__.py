"""What two processes must agree on: event types, the envelope, codecs, subjects and errors."""
