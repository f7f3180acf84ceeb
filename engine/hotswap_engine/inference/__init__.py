"""The inference side: what runs inside the vLLM container (the launcher with its control socket,
vLLM's plugin and the weight-transfer engine that applies the weights, the worker extension that
reports on them, and graph safety).

Imported by vLLM's processes, never by the agent: the agent reaches it only through the control
socket (`hotswap_engine.launcher_client`) and the hand-off channel. What both sides share (the
hand-off, the tensor fingerprint `hotswap_engine.digest`) lives outside it.
"""
