"""The agent's transports: `transport.base.Transport` implemented with the agent's resources
(`host.TransferHost`: rank workers, host buffers, the Mooncake endpoint). The runner reaches them
only through the registry in `transport.base`."""
