"""A stand-in for the kubelet on machines without a container runtime.

It registers one Node, binds unscheduled pods to it, and runs each container's command as a local
process on a per-pod loopback address (127.0.0.N), reporting pod status the way the kubelet does.
Container images are ignored: commands run with the kubelet's own PATH (the project venv first).
"""
