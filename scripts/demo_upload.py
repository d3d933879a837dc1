"""Upload .eopkg files to the dashboard's API (POST /api/v1/packages) with an API token.

python scripts/demo_upload.py --url http://127.0.0.1:8080 --token TOKEN pkg1.eopkg [pkg2.eopkg ...]
A package that is already there (same name and version) is reported and skipped.
"""
import argparse
import json
import sys
import uuid
import urllib.error
import urllib.request
from pathlib import Path


def upload(url: str, token: str, path: Path) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{url}/api/v1/packages", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("packages", nargs="+", type=Path)
    args = ap.parse_args()
    rc = 0
    for p in args.packages:
        status, doc = upload(args.url, args.token, p)
        if status in (200, 201):
            print(f"uploaded {p.name}")
        elif "already" in str(doc.get("message", "")):
            print(f"{p.name}: already uploaded")
        else:
            print(f"error: upload of {p.name} failed: HTTP {status} {doc.get('message', doc)}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
