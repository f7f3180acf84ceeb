"""The in-pod agent: HTTP API (`api`), state machine (`service`), byte work (`runner`)."""
