"""The gRPC face of the engine: the servicer, proto conversion, auth and error mapping."""
