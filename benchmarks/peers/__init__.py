"""The peer benchmark: Parley against a Pipecat pipeline on the same models (``make bench-peers``)."""
