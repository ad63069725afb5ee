//! `GET /openapi.json`: the OpenAPI 3.1 description of the HTTP API — every endpoint, header and
//! error code, and the unversioned aliases of the job routes. Kept by hand next to the routes; a
//! test checks it names every route and code.

use axum::Json;
use kiln_proto::ErrorCode;
use serde_json::{Value, json};

pub async fn spec() -> Json<Value> {
    Json(document())
}

/// The OpenAI-compatible paths, whose errors are in OpenAI's shape (`OpenAIError`).
const OPENAI_PATHS: [&str; 2] = ["/v1/embeddings", "/v1/models"];

fn error_response(description: &str) -> Value {
    error_of("Error", description)
}

fn retry_error(description: &str) -> Value {
    with_retry(error_response(description))
}

/// An error answer whose body is the schema `schema` of the components.
fn error_of(schema: &str, description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

fn with_retry(mut r: Value) -> Value {
    r["headers"] = json!({ "Retry-After": { "$ref": "#/components/headers/Retry-After" } });
    r
}

fn job_id() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "format": "uuid" } })
}

pub fn document() -> Value {
    let mut doc = routes();
    openai(&mut doc);
    predictions(&mut doc);
    aliased(&mut doc);
    secured(&mut doc);
    doc
}

fn problem(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Problem" } } } })
}

fn retry_problem(description: &str) -> Value {
    let mut r = problem(description);
    r["headers"] = json!({ "Retry-After": { "$ref": "#/components/headers/Retry-After" } });
    r
}

/// The Replicate-compatible predictions API (routes/predictions.rs): predictions are Kiln jobs.
fn predictions(doc: &mut Value) {
    let prediction = json!({ "application/json": { "schema": { "$ref": "#/components/schemas/Prediction" } } });
    let id = json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string" }, "description": "The prediction's id, which is its job's." });
    let host = "invalid_request: the Host header is missing or malformed (and KILN_PUBLIC_URL is unset)";
    let create = |summary: &str, extra: Vec<Value>, body: &str| {
        let mut parameters = vec![
            json!({ "name": "Prefer", "in": "header", "schema": { "type": "string", "example": "wait" },
                    "description": "wait (60 s) or wait=N (seconds), capped by KILN_MAX_WAIT: hold the request until the prediction finishes. A wait that runs out answers status starting, as Replicate does." }),
            json!({ "name": "Cancel-After", "in": "header", "schema": { "type": "string", "example": "1h30m" },
                    "description": "A duration from creation (30s, 5m, 1h30m, 250ms; or seconds): the prediction is canceled if not finished by then, queued or running. Bad values: 422 naming Cancel-After." }),
            json!({ "name": "Idempotency-Key", "in": "header", "schema": { "type": "string", "maxLength": 255 }, "description": "As for POST /v1/jobs." }),
        ];
        parameters.extend(extra);
        json!({ "post": {
            "summary": summary,
            "parameters": parameters,
            "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": body } } } },
            "responses": {
                "201": { "description": "Created (a job, durably queued); finished already when the wait sufficed",
                         "content": prediction.clone(),
                         "headers": { "Location": { "schema": { "type": "string" }, "description": "urls.get" }, "Preference-Applied": { "schema": { "type": "string" } } } },
                "400": problem("malformed_json"),
                "404": problem("model_not_found: not a served model (kiln/<model>[:<served version>]); not_found for a path parameter that is not UTF-8"),
                "409": problem("idempotency_key_reused, idempotency_key_in_flight"),
                "413": problem("payload_too_large"),
                "415": problem("unsupported_media_type"),
                "422": problem("invalid_request, invalid_input: the message names the field or header"),
                "503": retry_problem("broker_unavailable, store_unavailable, overloaded"),
            },
            "callbacks": { "webhook": { "{$request.body#/webhook}": { "post": {
                "summary": "The prediction (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature)",
                "requestBody": { "content": prediction.clone() },
                "responses": { "2XX": { "description": "Delivered; anything else is retried with backoff" } }
            } } } }
        } })
    };
    let owner = json!({ "name": "owner", "in": "path", "required": true, "schema": { "type": "string" }, "description": "kiln" });
    let name = json!({ "name": "name", "in": "path", "required": true, "schema": { "type": "string" }, "description": "A served model (GET /v1/models)" });
    let Some(paths) = doc["paths"].as_object_mut() else { return };
    paths.insert(
        "/v1/predictions".into(),
        create(
            "Create a prediction (Replicate-compatible): a Kiln job",
            vec![],
            "#/components/schemas/PredictionRequest",
        ),
    );
    paths.insert(
        "/v1/models/{owner}/{name}/predictions".into(),
        create(
            "Create a prediction of the model in the path",
            vec![owner, name],
            "#/components/schemas/ModelPredictionRequest",
        ),
    );
    let list_parameters = paths["/v1/jobs"]["get"]["parameters"].clone();
    paths["/v1/predictions"]["get"] = json!({
        "summary": "List predictions, newest first (Replicate-compatible)",
        "description": "The caller's predictions (every job is one), as GET /v1/jobs lists them and with its parameters, in Replicate's page shape: results, and next, the absolute URL of the next page (null on the last); previous is always null.",
        "parameters": list_parameters,
        "responses": {
            "200": { "description": "A page of predictions", "content": { "application/json": { "schema": { "type": "object", "required": ["previous", "next", "results"], "properties": {
                "previous": { "type": "null" },
                "next": { "type": ["string", "null"], "format": "uri" },
                "results": { "type": "array", "items": { "$ref": "#/components/schemas/Prediction" } } } } } } },
            "422": problem("invalid_request: the message names the parameter (status, model, created_after, limit, cursor, tenant; Host when KILN_PUBLIC_URL is unset)"),
            "503": retry_problem("store_unavailable")
        }
    });
    paths.insert("/v1/predictions/{id}".into(), json!({ "get": {
        "summary": "A prediction",
        "parameters": [ id.clone() ],
        "responses": { "200": { "description": "The prediction", "content": prediction.clone() },
                       "404": problem("job_not_found (another tenant's too); not_found for a path parameter that is not UTF-8"),
                       "422": problem(host), "503": retry_problem("store_unavailable") }
    } }));
    paths.insert("/v1/predictions/{id}/cancel".into(), json!({ "post": {
        "summary": "Cancel a prediction: a queued one never runs, a running one stops within one step; a finished one is answered as it is",
        "parameters": [ id ],
        "responses": { "200": { "description": "The prediction", "content": prediction },
                       "404": problem("job_not_found (another tenant's too); not_found for a path parameter that is not UTF-8"),
                       "422": problem(host), "503": retry_problem("store_unavailable") }
    } }));
    let schemas = &mut doc["components"]["schemas"];
    let webhook = json!({
        "webhook": { "type": "string", "format": "uri", "description": "Receives the prediction, signed (Standard Webhooks); internal addresses are refused." },
        "webhook_completed": { "type": "string", "format": "uri", "description": "A webhook for the completed event only." },
        "webhook_events_filter": { "type": "array", "items": { "enum": ["start", "output", "logs", "completed"] }, "description": "Default: all; completed is always sent." },
        "stream": { "type": "boolean", "description": "Accepted; urls.stream is always given (Kiln's job events)." },
    });
    let mut request = json!({ "type": "object", "required": ["version", "input"], "additionalProperties": false, "properties": {
        "version": { "type": "string", "example": "kiln/all-minilm-l6-v2", "description": "kiln/<model> or <model>, optionally :<version> (the served one)" },
        "input": { "description": "The model's task input; see GET /v1/models" },
    } });
    let mut for_model = json!({ "type": "object", "required": ["input"], "additionalProperties": false, "properties": {
        "input": { "description": "The model's task input; see GET /v1/models" },
    } });
    for (k, v) in webhook.as_object().into_iter().flatten() {
        request["properties"][k] = v.clone();
        for_model["properties"][k] = v.clone();
    }
    schemas["PredictionRequest"] = request;
    schemas["ModelPredictionRequest"] = for_model;
    let time = json!({ "type": ["string", "null"], "format": "date-time" });
    schemas["Prediction"] = json!({ "type": "object", "required": ["id", "model", "version", "status", "urls"], "properties": {
        "id": { "type": "string" }, "model": { "type": "string", "description": "kiln/<model>" }, "version": { "type": "string" },
        "status": { "enum": ["starting", "processing", "succeeded", "failed", "canceled"],
                    "description": "queued: starting; running: processing; expired (not started by its deadline or Cancel-After): canceled" },
        "input": { "description": "Echoed on the create answer; null later" },
        "output": { "description": "Generated files as a list of absolute URLs; other outputs as the job's" },
        "logs": { "type": "string" }, "error": { "type": ["string", "null"] },
        "metrics": { "type": "object", "properties": { "predict_time": { "type": ["number", "null"] }, "total_time": { "type": ["number", "null"] } } },
        "created_at": { "type": "string", "format": "date-time" }, "started_at": time.clone(), "completed_at": time,
        "urls": { "type": "object", "description": "Absolute, under KILN_PUBLIC_URL or the request's origin",
                  "properties": { "get": { "type": "string" }, "cancel": { "type": "string" }, "stream": { "type": "string" } } },
        "source": { "type": "string" }, "data_removed": { "type": "boolean" }
    } });
    schemas["Problem"] = json!({ "allOf": [ { "$ref": "#/components/schemas/Error" }, {
        "type": "object", "required": ["title", "status", "detail"],
        "description": "Problem details (RFC 9457) as Replicate's clients read them, next to Kiln's error object",
        "properties": { "title": { "type": "string" }, "status": { "type": "integer" }, "detail": { "type": "string" } } } ] });
}

/// `/jobs…` answers as `/v1/jobs…` does (the same handlers and scopes).
fn aliased(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else { return };
    let aliases: Vec<(String, Value)> = paths
        .iter()
        .filter_map(|(path, item)| {
            let alias = path.strip_prefix("/v1").filter(|p| p.starts_with("/jobs"))?;
            let mut item = item.clone();
            for op in item.as_object_mut()?.values_mut() {
                let summary = op["summary"].as_str().unwrap_or_default();
                op["summary"] = json!(format!("{summary} (alias of {path})"));
            }
            Some((alias.to_owned(), item))
        })
        .collect();
    paths.extend(aliases);
}

/// Every `/v1` operation (and its `/jobs` alias) needs a key (`KILN_AUTH=keys`, the default of
/// `kiln gateway`) and can be refused for it or over a limit.
fn secured(doc: &mut Value) {
    doc["components"]["securitySchemes"] = json!({ "bearer": {
        "type": "http", "scheme": "bearer",
        "description": "An API key, `kiln_<id>_<secret>` (`kiln keys create`). Not needed when the gateway runs with KILN_AUTH=off."
    } });
    let refusals = |schema: &str| {
        let mut limited = with_retry(error_of(
            schema,
            "rate_limited (the tenant's request rate), quota_exceeded (jobs in flight, compute-seconds per hour)",
        ));
        limited["headers"]["RateLimit-Policy"] =
            json!({ "schema": { "type": "string" }, "description": "e.g. \"requests\";q=100;w=2" });
        limited["headers"]["RateLimit"] =
            json!({ "schema": { "type": "string" }, "description": "e.g. \"requests\";r=0;t=1" });
        let challenge = json!({ "WWW-Authenticate": { "schema": { "type": "string" } } });
        let mut unauthorized = error_of(schema, "unauthorized: no key, or one malformed, unknown, revoked or expired");
        unauthorized["headers"] = challenge.clone();
        let mut forbidden = error_of(
            schema,
            "forbidden: the key lacks this route's scope (jobs:submit, jobs:read, admin; admin to list another tenant's jobs)",
        );
        forbidden["headers"] = challenge;
        (unauthorized, forbidden, limited)
    };
    let Some(paths) = doc["paths"].as_object_mut() else { return };
    for (path, item) in paths.iter_mut().filter(|(p, _)| p.starts_with("/v1/") || p.starts_with("/jobs")) {
        let schema = if OPENAI_PATHS.contains(&path.as_str()) { "OpenAIError" } else { "Error" };
        let (unauthorized, forbidden, limited) = refusals(schema);
        let Some(ops) = item.as_object_mut() else { continue };
        for op in ops.values_mut().filter(|op| op.get("responses").is_some()) {
            op["security"] = json!([{ "bearer": [] }]);
            op["responses"]["401"] = unauthorized.clone();
            op["responses"]["403"] = forbidden.clone();
            op["responses"]["429"] = limited.clone();
        }
    }
}

/// The OpenAI-compatible routes (`routes::openai`): `POST /v1/embeddings`, and `GET /v1/models`
/// in OpenAI's list shape.
fn openai(doc: &mut Value) {
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    let err = |description: &str| error_of("OpenAIError", description);
    doc["paths"]["/v1/embeddings"] = json!({ "post": {
        "summary": "Embed texts (OpenAI-compatible)",
        "description": "OpenAI's embeddings API, served as an embedding job of the model (result cache, coalescing, the tenant's quotas) and answered on the request. The job is waited for up to KILN_OPENAI_WAIT (default 30 s); past it the answer is 504 wait_timeout with Retry-After while the job goes on, and a retry joins it or reads its result from the cache. usage counts the tokens the model saw (special tokens included, after truncation). Errors are in OpenAI's shape, with Kiln's stable code in error.code.",
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/EmbeddingsRequest" } } } },
        "responses": {
            "200": { "description": "The vectors, in the order of the input",
                     "headers": { "Kiln-Job-Id": { "schema": { "type": "string", "format": "uuid" }, "description": "The job that made them (GET /v1/jobs/{id})" } },
                     "content": { "application/json": { "schema": { "$ref": "#/components/schemas/EmbeddingsResponse" } } } },
            "400": err("malformed_json"),
            "404": err("model_not_found (param: model)"),
            "409": err("canceled, deadline_exceeded: the job was canceled (POST /v1/jobs/{id}/cancel) before it finished"),
            "413": err("payload_too_large"),
            "415": err("unsupported_media_type"),
            "422": err("invalid_request (param names the field: input, model, encoding_format, dimensions, user; token-id input and dimensions on a model that does not support it are refused here), invalid_input (the worker refused the input)"),
            "502": with_retry(err("inference_failed, worker_lost, job_lost: the job failed; a retry runs it again")),
            "503": with_retry(err("broker_unavailable, store_unavailable, overloaded (submissions or long-poll slots, KILN_MAX_WAITERS)")),
            "504": with_retry(err("wait_timeout: the job did not finish within KILN_OPENAI_WAIT; it goes on, retry after Retry-After")),
        }
    } });
    doc["paths"]["/v1/models"] = json!({ "get": {
        "summary": "Served models (OpenAI's list shape, with Kiln's details in each entry)",
        "responses": { "200": { "description": "Every served model",
                                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ModelList" } } } } }
    } });
    let schemas = &mut doc["components"]["schemas"];
    schemas["OpenAIError"] = json!({ "type": "object", "required": ["error"], "properties": { "error": { "type": "object",
        "required": ["message", "type", "param", "code"], "properties": {
            "message": { "type": "string" },
            "type": { "enum": ["invalid_request_error", "authentication_error", "permission_error", "rate_limit_error", "insufficient_quota", "server_error"] },
            "param": { "type": ["string", "null"], "description": "The request field at fault, when one is" },
            "code": { "type": "string", "enum": codes, "description": "Kiln's stable error code" } } } } });
    schemas["EmbeddingsRequest"] = json!({ "type": "object", "required": ["input", "model"], "additionalProperties": false, "properties": {
        "input": { "oneOf": [ { "type": "string" }, { "type": "array", "minItems": 1, "items": { "type": "string" } } ],
                   "description": "A text or a list of texts (at most the model's limits.max_texts, each at most limits.max_text_chars). Token ids are refused with 422." },
        "model": { "type": "string", "description": "An embedding model of GET /v1/models" },
        "encoding_format": { "enum": ["float", "base64"], "description": "float (the default): JSON numbers; base64: the little-endian f32 bytes of each vector, base64-encoded" },
        "dimensions": { "type": "integer", "minimum": 1, "description": "Only for models whose [embedding] sets matryoshka = true (none served by default): the vector is cut to this length and normalised again. Elsewhere 422, param dimensions." },
        "user": { "type": "string", "description": "Accepted and ignored" }
    } });
    schemas["EmbeddingsResponse"] = json!({ "type": "object", "required": ["object", "data", "model", "usage"], "properties": {
        "object": { "const": "list" },
        "data": { "type": "array", "items": { "type": "object", "required": ["object", "index", "embedding"], "properties": {
            "object": { "const": "embedding" }, "index": { "type": "integer" },
            "embedding": { "oneOf": [ { "type": "array", "items": { "type": "number" } }, { "type": "string", "contentEncoding": "base64" } ] } } } },
        "model": { "type": "string" },
        "usage": { "type": "object", "required": ["prompt_tokens", "total_tokens"], "properties": {
            "prompt_tokens": { "type": "integer" }, "total_tokens": { "type": "integer" } } }
    } });
    schemas["ModelList"] = json!({ "type": "object", "required": ["object", "data"], "properties": {
        "object": { "const": "list" },
        "data": { "type": "array", "items": { "type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
            "id": { "type": "string" }, "object": { "const": "model" },
            "created": { "type": "integer", "description": "Always 0: Kiln does not know when a model was made" },
            "owned_by": { "const": "kiln" },
            "name": { "type": "string", "description": "Kiln's name of the model (= id)" }, "version": { "type": "string" },
            "task": { "enum": ["embedding", "image-generation", "text-to-image"] }, "max_batch": { "type": "integer" },
            "input_schema": { "description": "JSON Schema of the task's input of POST /v1/jobs" },
            "workers": { "type": "array", "items": { "type": "string" }, "description": "Workers that consumed the model's queue in the last 20 s" } } } }
    } });
}

fn routes() -> Value {
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    let job = json!({ "$ref": "#/components/schemas/Job" });
    let job_content = json!({ "application/json": { "schema": job } });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Kiln",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Inference jobs: submit, then poll, wait, stream events, or receive signed webhooks.",
        },
        "paths": {
            "/v1/jobs": { "post": {
                "summary": "Submit a job",
                "parameters": [
                    { "name": "Idempotency-Key", "in": "header", "schema": { "type": "string", "maxLength": 255 },
                      "description": "The same key with the same body returns the same job (for KILN_IDEMPOTENCY_TTL); with another body, 409 idempotency_key_reused." },
                    { "name": "Prefer", "in": "header", "schema": { "type": "string", "example": "wait=10" },
                      "description": "wait=N (seconds, capped by KILN_MAX_WAIT): answer 200 with the finished job if it completes in time." },
                    { "name": "Cancel-After", "in": "header", "schema": { "type": "number" },
                      "description": "Seconds; a job not started by then ends expired (like deadline_s)." }
                ],
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/JobRequest" } } } },
                "responses": {
                    "200": { "description": "Finished within Prefer: wait, or an idempotent repeat of a finished job", "content": job_content,
                             "headers": { "Location": { "$ref": "#/components/headers/Location" }, "Preference-Applied": { "schema": { "type": "string" } } } },
                    "202": { "description": "Accepted: durably queued", "content": job_content,
                             "headers": { "Location": { "$ref": "#/components/headers/Location" } } },
                    "400": error_response("malformed_json"),
                    "404": error_response("model_not_found"),
                    "409": error_response("idempotency_key_reused, idempotency_key_in_flight"),
                    "413": error_response("payload_too_large"),
                    "415": error_response("unsupported_media_type"),
                    "422": error_response("invalid_request, invalid_input: the message names the field"),
                    "503": retry_error("broker_unavailable, store_unavailable, overloaded"),
                },
                "callbacks": { "webhook": { "{$request.body#/webhook}": { "post": {
                    "summary": "Job event (Standard Webhooks)",
                    "parameters": [
                        { "name": "webhook-id", "in": "header", "required": true, "schema": { "type": "string" }, "description": "Stable across retries of one event." },
                        { "name": "webhook-timestamp", "in": "header", "required": true, "schema": { "type": "integer" }, "description": "Unix seconds of the event." },
                        { "name": "webhook-signature", "in": "header", "required": true, "schema": { "type": "string" },
                          "description": "v1,<base64 HMAC-SHA256 of \"{webhook-id}.{webhook-timestamp}.{body}\"> with the whsec_ secret." }
                    ],
                    "requestBody": { "content": { "application/json": { "schema": { "$ref": "#/components/schemas/WebhookPayload" } } } },
                    "responses": { "2XX": { "description": "Delivered; anything else is retried with backoff, honouring Retry-After" } }
                } } } }
            }, "get": {
                "summary": "List jobs, newest first",
                "description": "The caller's jobs (a tenant's key: its tenant's; an admin key: every tenant's, or tenant's), newest first by created_at, a page at a time: pass next_cursor back as cursor until it is null. Jobs created after the first page never show up in later pages; none is listed twice. Each record is what GET /v1/jobs/{id} answers. A page looks at a bounded number of jobs, so a selective filter can answer a short (even empty) page with a next_cursor. An empty parameter is the same as none.",
                "parameters": [
                    { "name": "status", "in": "query", "schema": { "enum": ["queued", "running", "succeeded", "failed", "canceled", "expired"] } },
                    { "name": "model", "in": "query", "schema": { "type": "string" } },
                    { "name": "created_after", "in": "query", "schema": { "type": "string", "example": "2026-12-01T10:00:00Z" },
                      "description": "Jobs created strictly after this time: RFC 3339, or unix milliseconds." },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 100, "default": 20 } },
                    { "name": "cursor", "in": "query", "schema": { "type": "string" }, "description": "next_cursor of the previous page, as it was given." },
                    { "name": "tenant", "in": "query", "schema": { "type": "string" }, "description": "Admin keys: list only this tenant's jobs." }
                ],
                "responses": {
                    "200": { "description": "A page of jobs", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/JobList" } } } },
                    "422": error_response("invalid_request: the message names the parameter (status, model, created_after, limit, cursor, tenant; query for one given twice or not UTF-8)"),
                    "503": retry_error("store_unavailable")
                }
            } },
            "/v1/jobs/{id}": { "get": {
                "summary": "A job's record",
                "parameters": [ job_id(), { "name": "wait", "in": "query", "schema": { "type": "integer", "minimum": 0 },
                                            "description": "Long-poll: return as soon as the job finishes, or after this many seconds." } ],
                "responses": { "200": { "description": "The record", "content": job_content }, "404": error_response("job_not_found; not_found for a path parameter that is not UTF-8"),
                               "422": error_response("invalid_request: a malformed query parameter (wait not a whole number of seconds, or given twice)"),
                               "503": retry_error("store_unavailable, or overloaded: the gateway's long-polls are all taken (KILN_MAX_WAITERS)") }
            } },
            "/v1/jobs/{id}/cancel": { "post": {
                "summary": "Cancel a queued or running job",
                "parameters": [ job_id() ],
                "responses": { "200": { "description": "Canceled", "content": job_content }, "404": error_response("job_not_found; not_found for a path parameter that is not UTF-8"),
                               "409": error_response("job_finished: the job is already terminal"), "503": retry_error("store_unavailable") }
            } },
            "/v1/jobs/{id}/events": { "get": {
                "summary": "Server-sent events of a job",
                "description": "Events status, progress and completed, each with an id; the stream ends after completed (or once the job is over and nothing is left to send). Without Last-Event-ID it starts with the current state.",
                "parameters": [ job_id(), { "name": "Last-Event-ID", "in": "header", "schema": { "type": "string" }, "description": "Resume after this event." } ],
                "responses": { "200": { "description": "text/event-stream", "content": { "text/event-stream": { "schema": { "type": "string" } } } },
                               "204": { "description": "A resume (Last-Event-ID) of a finished job whose completed event the client has: nothing left to send; an EventSource stops reconnecting" },
                               "404": error_response("job_not_found; not_found for a path parameter that is not UTF-8"),
                               "503": retry_error("store_unavailable, or overloaded: the gateway's event streams are all open (KILN_MAX_EVENT_STREAMS)") }
            } },
            "/v1/jobs/{id}/outputs/{name}": { "get": {
                "summary": "A job's output file (a generated image)",
                "description": "Listed in the job's output as images[].url with size and sha256. Strong ETag = the sha256; If-None-Match answers 304. Outputs expire with the job.",
                "parameters": [ job_id(), { "name": "name", "in": "path", "required": true, "schema": { "type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$" } },
                                { "name": "If-None-Match", "in": "header", "schema": { "type": "string" } } ],
                "responses": { "200": { "description": "The file, with Content-Type, Content-Length and ETag",
                                        "headers": { "ETag": { "schema": { "type": "string" } } },
                                        "content": { "image/png": { "schema": { "type": "string", "format": "binary" } } } },
                               "304": { "description": "Not modified" },
                               "404": error_response("job_not_found, output_not_found; not_found for a path parameter that is not UTF-8"), "503": retry_error("store_unavailable") }
            } },
            "/v1/models": { "get": { "summary": "Served models", "responses": { "200": { "description": "Models with task, version, max_batch, input JSON Schema, and the workers serving each" } } } },
            "/healthz": { "get": { "summary": "Liveness", "responses": { "200": { "description": "Alive" } } } },
            "/readyz": { "get": { "summary": "Readiness", "responses": { "200": { "description": "Broker and store reachable, not draining",
                                                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Readiness" } } } }, "503": { "description": "Not ready: a dependency is down, or the gateway is draining. The body says which (not an Error)",
                                                   "headers": { "Retry-After": { "$ref": "#/components/headers/Retry-After" } },
                                                   "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Readiness" } } } } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics of this process (text format 0.0.4)", "responses": { "200": { "description": "kiln_gateway_* series (and kiln_worker_* where a worker runs in the same process)" } } } },
            "/openapi.json": { "get": { "summary": "This document", "responses": { "200": { "description": "OpenAPI 3.1" } } } },
        },
        "components": {
            "headers": {
                "Location": { "schema": { "type": "string" }, "description": "/v1/jobs/{id}" },
                "Retry-After": { "schema": { "type": "integer" }, "description": "Seconds to wait before retrying." }
            },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": {
                    "code": { "type": "string", "enum": codes }, "message": { "type": "string" } } } } },
                "JobRequest": { "type": "object", "required": ["model", "input"], "additionalProperties": false, "properties": {
                    "model": { "type": "string" },
                    "input": { "description": "The model's task input; see GET /v1/models" },
                    "metadata": { "type": "object", "description": "Echoed back on the record; at most 4 KiB." },
                    "deadline_s": { "type": "number", "exclusiveMinimum": 0, "description": "Expire the job if not started within this many seconds." },
                    "webhook": { "type": "string", "format": "uri", "description": "Receives signed job events; internal addresses are refused." },
                    "webhook_events": { "type": "array", "items": { "enum": ["start", "progress", "completed"] }, "description": "completed is always sent." },
                    "cache": { "type": "boolean", "description": "false: never answered from the result cache nor coalesced onto an identical job (default true)." }
                } },
                "Job": { "type": "object", "properties": {
                    "id": { "type": "string", "format": "uuid" }, "model": { "type": "string" },
                    "status": { "enum": ["queued", "running", "succeeded", "failed", "canceled", "expired"] },
                    "created_at": { "type": "string", "format": "date-time" }, "started_at": { "type": ["string", "null"] }, "completed_at": { "type": ["string", "null"] },
                    "attempts": { "type": "integer" }, "progress": {}, "output": {}, "error": { "oneOf": [ { "type": "null" }, { "$ref": "#/components/schemas/JobError" } ] },
                    "cached": { "type": "boolean" },
                    "metrics": { "type": "object", "properties": { "queue_ms": { "type": ["integer", "null"] }, "run_ms": { "type": ["integer", "null"] } } },
                    "metadata": { "type": "object" }, "deadline_at": { "type": "string", "format": "date-time" },
                    "webhook": { "type": "object", "properties": { "url": { "type": "string" }, "events": { "type": "array" }, "attempts": { "type": "integer" },
                                 "last_status": { "type": ["integer", "null"] }, "delivered_at": { "type": ["string", "null"] }, "gave_up_at": { "type": ["string", "null"] } } }
                } },
                "JobList": { "type": "object", "required": ["data", "next_cursor"], "properties": {
                    "data": { "type": "array", "items": { "$ref": "#/components/schemas/Job" } },
                    "next_cursor": { "type": ["string", "null"], "description": "Where the next page starts; null after the last." } } },
                "Readiness": { "type": "object", "required": ["status", "draining", "checks"], "properties": {
                    "status": { "enum": ["ready", "not_ready"] }, "draining": { "type": "boolean" },
                    "checks": { "type": "object", "description": "broker and store: ok, or a stable word saying why not (the error itself is in the log)",
                                "properties": { "broker": { "type": "string" }, "store": { "type": "string" } } } } },
                "JobError": { "type": "object", "properties": { "code": { "type": "string", "enum": codes }, "message": { "type": "string" } } },
                "WebhookPayload": { "type": "object", "properties": {
                    "type": { "enum": ["job.started", "job.progress", "job.completed"] }, "timestamp": { "type": "string", "format": "date-time" },
                    "data": { "$ref": "#/components/schemas/Job" } } }
            }
        }
    })
}
