"""Old import paths of the HTTP and gRPC adapters, kept for users: the code is in ``metrion_fixture.integrations``."""
