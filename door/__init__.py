"""The front door (data plane): the OpenAI-compatible HTTP server, routing, admission, KV-aware routing, the engine legs of a request."""
