# The local-cluster fixtures (hotswap_cluster, kube_api, namespace, waiter, sa_client).
pytest_plugins = ["hotswap_cluster.pytest_plugin"]
