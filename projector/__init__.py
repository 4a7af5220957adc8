"""The projector process: consumes the JetStream event stream and keeps the MongoDB read models current.

Run it with `python -m projector`; tests start it in-process with `projector.runner.Projector`.
"""
