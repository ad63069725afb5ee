#!/usr/bin/env python3
"""Drives Kiln's OpenAI-compatible embeddings API with the official `openai` client, as an
application would, and prints what it got as one JSON object on stdout for the test that runs it
(cli/tests/it/openai.rs), which compares the vectors with reference embeddings and the usage with
the tokenizer's counts.

    python openai_embeddings.py BASE_URL API_KEY MODEL '["text", ...]'

Calls, in order (each a real HTTP request; retries off, so every answer is the server's first):
- base64_list:   a list input, no encoding_format: the client asks for base64 and decodes it
                 (with numpy, which the venv has);
- base64_string: a string input, likewise;
- float_list:    the list again with encoding_format="float" (a cache hit: its job id is kept);
- float_string:  the string with encoding_format="float";
- wire:          the raw answer of a call without encoding_format (what was asked, what came);
- token_ids, token_id_lists: token-id inputs, which must raise the client's error for 422;
- models:        client.models.list().
"""

import json
import sys

import numpy
import openai


def result(response):
    data = sorted(response.data, key=lambda d: d.index)
    return {
        "object": response.object,
        "model": response.model,
        "indices": [d.index for d in data],
        "vectors": [[float(x) for x in d.embedding] for d in data],
        "usage": {"prompt_tokens": response.usage.prompt_tokens, "total_tokens": response.usage.total_tokens},
    }


def refusal(call):
    try:
        call()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {"unparsed": str(e.body)}
        return {"exception": type(e).__name__, "status": e.status_code, "body": body}
    return {"exception": None}


def main():
    base_url, api_key, model, texts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    embed = client.embeddings.create
    out = {"openai": openai.__version__, "numpy": numpy.__version__}
    out["base64_list"] = result(embed(model=model, input=texts))
    out["base64_string"] = result(embed(model=model, input=texts[0]))
    raw = client.embeddings.with_raw_response.create(model=model, input=texts, encoding_format="float")
    out["float_list"] = result(raw.parse())
    out["float_list"]["job"] = raw.headers.get("kiln-job-id")
    out["float_string"] = result(embed(model=model, input=texts[0], encoding_format="float"))
    raw = client.embeddings.with_raw_response.create(model=model, input=texts[0])
    sent = json.loads(raw.http_request.content)
    came = raw.http_response.json()["data"][0]["embedding"]
    out["wire"] = {"asked": sent.get("encoding_format"), "came_as": type(came).__name__}
    out["token_ids"] = refusal(lambda: embed(model=model, input=[1, 2, 3]))
    out["token_id_lists"] = refusal(lambda: embed(model=model, input=[[1, 2], [3]]))
    out["models"] = [m.id for m in client.models.list().data]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
