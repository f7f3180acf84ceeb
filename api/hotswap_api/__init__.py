"""hotswap's shared vocabulary: the names the operator, the engine and the CLI agree on.

Pydantic and the standard library only (no torch, aiohttp, zmq, kopf or kubernetes, no I/O), so every
process can import it, and the import contracts in pyproject.toml keep it that way:

- `resources`: the custom resources (InferencePool, WeightVersion) as pydantic models; the CRDs are
  generated from them.
- `protocol`: the agent's HTTP API (requests, answers, `ErrorBody`).
- `errors`: the error codes, one enum for the agent's answers, the operator's classification and the CLI.
- `labels`: labels, annotations, the readiness gate and the reserved base version name.
- `launcher`: messages of the inference container's control socket (the agent ↔ vLLM launcher).
- `rank_messages`: messages between the agent and its rank workers (one per GPU).
"""
