"""A simulated vLLM engine: vLLM's OpenAI API, KV events and metrics, served from a
simulated paged KV cache and a continuous-batching scheduler that spends time as a
calibrated cost model says (``profile.py``). Started by the engine actor like a real
engine when ``ENGINE_KIND=simulated``; see docs/simulated-engines.md."""
