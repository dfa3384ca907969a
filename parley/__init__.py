"""Generated protobuf and gRPC code for the Parley contract (``protos/``).

Do not edit: run ``make proto`` to regenerate. Import as ``from parley.v1 import voice_pb2``.
"""
