"""The inference side: what runs inside the vLLM container (the launcher with its control socket, the
worker extension that applies the weights, and what they need: graph safety, digests).

Imported by vLLM's processes, never by the agent: the agent reaches it only through the control
socket (`hotswap_engine.launcher_client`) and the hand-off channel.
"""
