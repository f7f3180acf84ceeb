"""Container that reports what it sees of its volumes, env and in-cluster credentials.

Writes one JSON file into the folder given as argv[1] (a hostPath volume the test reads back).
"""

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


out_dir = sys.argv[1]
shared = "/tmp/hotswap-test/shared/from-writer"
for _ in range(200):  # the writer container fills the shared emptyDir
    if os.path.exists(shared):
        break
    time.sleep(0.05)
report: dict[str, object] = {"shared": read(shared) if os.path.exists(shared) else None}
report["secret_file"] = read("/tmp/hotswap-test/secret/password")
try:
    with open("/tmp/hotswap-test/secret/new-file", "w") as f:
        f.write("x")
    report["secret_writable"] = True
except OSError as e:
    report["secret_writable"] = False
    report["secret_write_error"] = str(e)
report["env"] = {
    k: os.environ.get(k)
    for k in ("POD_NAME", "POD_NAMESPACE", "POD_IP", "NODE", "FROM_SECRET", "FROM_CM", "EXPANDED")
}
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
token = read(f"{sa}/token")
namespace = read(f"{sa}/namespace")
ctx = ssl.create_default_context(cafile=f"{sa}/ca.crt")
api = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
url = f"{api}/api/v1/namespaces/{namespace}/secrets"
req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
try:
    urllib.request.urlopen(req, context=ctx, timeout=10)
    report["in_cluster_status"] = 200
except urllib.error.HTTPError as e:
    report["in_cluster_status"] = e.code
    report["in_cluster_body"] = e.read().decode()
report["sa_namespace"] = namespace
tmp = os.path.join(out_dir, "report.json.tmp")
with open(tmp, "w") as f:
    json.dump(report, f)
os.rename(tmp, os.path.join(out_dir, "report.json"))
time.sleep(3600)
