"""Real-process test infrastructure (no mocks): a SeaweedFS S3 server and a two-node Ray cluster on 127.0.0.1."""
