"""`helm test`: the router answers an OpenAI-style completion end to end (router → decode ← prefill).

    smoke_test.py --url http://ROUTER:80 [--api-key-file FILE] [--wait 600]

Waits for GET /health to say 200 (a decode worker is registered), then asks for a few tokens
through GET /v1/models and POST /v1/completions. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def _request(url: str, key: str | None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {"error": err.read().decode(errors="replace")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the router's HTTP base URL")
    parser.add_argument("--api-key-file", default=None)
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for /health")
    args = parser.parse_args(argv)
    base = args.url.rstrip("/")
    key = None
    if args.api_key_file:
        with open(args.api_key_file) as f:
            key = next((line.strip() for line in f if line.strip()), None)
    deadline = time.monotonic() + args.wait
    while True:
        try:
            status, _ = _request(f"{base}/health", None)
        except OSError as err:  # connection refused while the router starts
            status = f"unreachable ({err})"
        if status == 200:
            break
        if time.monotonic() > deadline:
            print(f"smoke test: {base}/health is {status} after {args.wait:.0f} s", file=sys.stderr)
            return 1
        time.sleep(2)
    status, models = _request(f"{base}/v1/models", key)
    if status != 200 or not models.get("data"):
        print(f"smoke test: GET /v1/models -> {status} {models}", file=sys.stderr)
        return 1
    model = models["data"][0]["id"]
    body = {"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    status, completion = _request(f"{base}/v1/completions", key, body)
    choices = completion.get("choices") or []
    if status != 200 or not choices or not completion.get("usage", {}).get("completion_tokens"):
        print(f"smoke test: POST /v1/completions -> {status} {completion}", file=sys.stderr)
        return 1
    print(f"smoke test: {model} answered {choices[0].get('text')!r} ({completion['usage']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
