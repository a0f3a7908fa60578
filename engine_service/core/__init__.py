"""The engine core: the Engine, the run actor, the run record and what they share. No grpc here."""
