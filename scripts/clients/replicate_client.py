"""Kiln's predictions API driven by the official Python clients, `replicate` and `standardwebhooks`
(pinned in scripts/clients/replicate-requirements.txt, installed by scripts/client-venv.sh), for the
integration test cli/tests/it/predictions.rs. Each command prints one JSON line of what it saw and
exits non-zero (with the reason on stderr) when the client did not see what Kiln promises.

    python replicate_client.py run BASE TOKEN MODEL        # client.run on the terrain model
    python replicate_client.py create-wait BASE TOKEN MODEL
    python replicate_client.py cancel BASE TOKEN MODEL     # a running prediction ends canceled
    python replicate_client.py error BASE TOKEN            # a refusal as ReplicateError
    python replicate_client.py list BASE TOKEN PAGE        # every prediction, PAGE to a page
    python replicate_client.py verify SECRET DELIVERY.json # a Kiln webhook, then a tampered one
"""

import json
import sys
import time

import replicate
import standardwebhooks
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput

PNG = b"\x89PNG\r\n\x1a\n"
TERRAIN = {"difficulty": 30, "seed": 7, "count": 2, "width": 64, "height": 64}


def fail(why):
    print(f"replicate_client: {why}", file=sys.stderr)
    sys.exit(1)


def client(base, token):
    return replicate.Client(api_token=token, base_url=base)


def run(base, token, model):
    c = client(base, token)
    output = c.run(model, input=TERRAIN)
    if not isinstance(output, list) or len(output) != TERRAIN["count"]:
        fail(f"run answered {output!r}, not a list of {TERRAIN['count']} files")
    files = []
    for item in output:
        # This client version makes FileOutput of https URLs only; plain-http URLs come as strings.
        f = item if isinstance(item, FileOutput) else FileOutput(str(item), c)
        data = f.read()
        if not data.startswith(PNG):
            fail(f"{f.url} is not a PNG: {data[:16]!r}")
        files.append({"url": f.url, "bytes": len(data)})
    print(json.dumps({"files": files}))


def create_wait(base, token, model):
    c = client(base, token)
    seen = []
    for p in (
        c.predictions.create(version=model, input={"text": "a prediction by version"}),
        c.predictions.create(model=model, input={"texts": ["by the model's path", "two texts"]}),
    ):
        if p.status not in ("starting", "processing", "succeeded"):
            fail(f"created {p.id} as {p.status}")
        p.wait()
        if p.status != "succeeded":
            fail(f"{p.id} ended {p.status}: {p.error}")
        if not p.metrics or p.metrics.get("predict_time") is None:
            fail(f"{p.id} has no metrics.predict_time: {p.metrics}")
        if not p.urls["get"].startswith(base):
            fail(f"{p.id}: urls.get {p.urls['get']} is not under {base}")
        seen.append({"id": p.id, "model": p.model, "dim": p.output["dim"], "n": len(p.output["embeddings"]),
                     "predict_time": p.metrics["predict_time"], "logs": p.logs,
                     "created_at": p.created_at, "completed_at": p.completed_at})
    print(json.dumps({"predictions": seen}))


def cancel(base, token, model):
    c = client(base, token)
    p = c.predictions.create(model=model, input={"difficulty": 40, "count": 64, "seed": 3})
    deadline = time.monotonic() + 120
    while p.status != "processing":
        if p.status in ("succeeded", "failed", "canceled") or time.monotonic() > deadline:
            fail(f"{p.id} never seen processing; last {p.status}")
        time.sleep(0.05)
        p.reload()
    p.cancel()
    p.wait()
    if p.status != "canceled":
        fail(f"{p.id} ended {p.status} after cancel")
    print(json.dumps({"id": p.id, "status": p.status, "logs": p.logs}))


def error(base, token):
    c = client(base, token)
    try:
        c.predictions.create(version="kiln/no-such-model", input={})
    except ReplicateError as e:
        print(json.dumps({"status": e.status, "title": e.title, "detail": e.detail}))
        return
    fail("a prediction of an unknown model was created")


def list_all(base, token, page):
    c = client(base, token)
    # The client's cursor is the URL of a page: the first one asks for small pages, and each
    # page's `next` carries the size on.
    pages, ids = [c.predictions.list(cursor=f"{base}/v1/predictions?limit={page}")], []
    while pages[-1].next:
        pages.append(c.predictions.list(cursor=pages[-1].next))
    for p in pages:
        if p.previous is not None:
            fail(f"a page with previous {p.previous!r}")
        ids.extend({"id": r.id, "status": r.status, "model": r.model} for r in p.results)
    print(json.dumps({"pages": len(pages), "predictions": ids}))


def verify(secret, path):
    with open(path, encoding="utf-8") as f:
        delivery = json.load(f)
    wh = standardwebhooks.Webhook(secret)
    payload = wh.verify(delivery["body"], delivery["headers"])
    tampered = delivery["body"].replace('"status":', '"status": ', 1)
    if tampered == delivery["body"]:
        fail("nothing to tamper with in the body")
    try:
        wh.verify(tampered, delivery["headers"])
    except standardwebhooks.WebhookVerificationError:
        print(json.dumps({"id": payload["id"], "status": payload["status"], "tampered": "rejected"}))
        return
    fail("a tampered body verified")


COMMANDS = {"run": run, "create-wait": create_wait, "cancel": cancel, "error": error, "list": list_all, "verify": verify}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        fail(f"usage: {sys.argv[0]} {'|'.join(COMMANDS)} ARGS…")
    COMMANDS[sys.argv[1]](*sys.argv[2:])
