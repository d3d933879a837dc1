"""The contracts import in a fresh interpreter without any ML runtime, web or MQTT library."""
import subprocess
import sys

BLOCKED = ["onnx", "onnxruntime", "openvino", "nncf", "ai_edge_litert", "tflite_runtime", "torch",
           "flask", "sqlalchemy", "paho"]

CODE = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import edgeopt.sdk.profile, edgeopt.sdk.package, edgeopt.sdk.telemetry, edgeopt.sdk.topics, edgeopt.sdk.errors
import edgeopt.sdk.command_signing
print('ok')
"""


def test_contracts_import_without_runtimes():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
