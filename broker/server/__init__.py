"""gRPC wiring: app start-up and shutdown, auth interceptor, servicer, proto conversion."""
