"""Development tools for the Credential Broker: the benchmark (``bench``), the fake OAuth 2.0
authorization server (``fakeauth``) and the demo provider (``demo``). Not part of the server
distribution or its image."""
