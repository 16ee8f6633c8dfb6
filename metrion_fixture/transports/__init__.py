"""Old import paths of the HTTP and gRPC adapters, kept for users: the code is in :mod:`metrion_fixture.integrations`."""
