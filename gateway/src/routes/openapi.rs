//! `GET /openapi.json`: the OpenAPI 3.1 description of the HTTP API, generated from the code with
//! utoipa. Each handler's `#[utoipa::path]` says its method, path, parameters and headers, body and
//! every status it answers; the wire types derive their schemas (kiln-proto's `openapi` feature).
//! This file owns what is shared: the list of operations ([`ApiDoc`]), the schemas of the bodies
//! the handlers parse by hand (no serde type to derive them from), and the [`Shared`] step: the
//! bearer scheme with 401/403/429 on every keyed operation, the webhook callbacks, and the
//! `/jobs…` aliases of the `/v1/jobs…` operations. A test checks that the document names every
//! route of the router and every error code.

use axum::Json;
use kiln_proto::{ErrorCode, Task};
use serde_json::{Value, json};
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, ResponseBuilder, Type};
use utoipa::{Modify, OpenApi};

pub use bodies::*;

use super::{events, files, jobs, listing, openai, outputs, predictions, system};

pub async fn spec() -> Json<Value> {
    Json(document())
}

/// The document, as `/openapi.json` answers it.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    linked(&mut doc);
    doc
}

/// OpenAPI links from the answers that make a job to the operations that take its id, so that
/// clients (and the fuzzer's stateful phase) can follow a created job to its record, cancel and
/// events. In the JSON: utoipa 5 has no typed links.
fn linked(doc: &mut Value) {
    let to = |operation: &str| json!({ "operationId": operation, "parameters": { "id": "$response.body#/id" } });
    let job = json!({ "GetJob": to("get_job"), "CancelJob": to("cancel_job"), "JobEvents": to("job_events") });
    let prediction = json!({ "GetPrediction": to("get_prediction"), "CancelPrediction": to("cancel_prediction") });
    for (path, links) in [
        ("/v1/jobs", &job),
        ("/jobs", &job),
        ("/v1/predictions", &prediction),
        ("/v1/models/{owner}/{name}/predictions", &prediction),
    ] {
        let Some(responses) = doc["paths"][path]["post"]["responses"].as_object_mut() else { continue };
        for (status, response) in responses.iter_mut() {
            if status.starts_with('2') {
                response["links"] = links.clone();
            }
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Kiln", description = "Inference jobs: submit, then poll, wait, stream events, or receive signed webhooks."),
    paths(
        jobs::submit, listing::list, jobs::get, jobs::cancel, events::stream, outputs::get,
        predictions::create, predictions::create_for_model, predictions::list, predictions::get, predictions::cancel,
        openai::models, openai::embeddings,
        files::upload, files::get, files::content, files::delete,
        system::healthz, system::readyz, system::metrics, spec_doc,
    ),
    components(schemas(ErrorCode, Task, WebhookPayload)),
    modifiers(&Shared),
)]
struct ApiDoc;

/// `GET /openapi.json` (the handler is [`spec`]; this is its description).
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "system",
    responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
#[allow(dead_code)]
fn spec_doc() {}

/// The OpenAI-compatible paths, whose errors are in OpenAI's shape (`OpenAIError`).
const OPENAI_PATHS: [&str; 2] = ["/v1/embeddings", "/v1/models"];

/// The description's shared parts, added to what the handlers' annotations say.
struct Shared;

impl Modify for Shared {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        callbacks(doc);
        secured(doc);
        aliased(doc);
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [&mut item.get, &mut item.post, &mut item.put, &mut item.delete, &mut item.patch].into_iter().flatten()
}

fn retry_after() -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(Type::Integer))
        .description(Some("Seconds to wait before retrying."))
        .build()
}

fn string_header(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(Type::String))
        .description((!description.is_empty()).then(|| description.to_owned()))
        .build()
}

/// Every `/v1` operation (and so its `/jobs` alias) needs a key (`KILN_AUTH=keys`, the default of
/// `kiln gateway`) and can be refused for it or over a limit.
fn secured(doc: &mut utoipa::openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.security_schemes.insert(
        "bearer".into(),
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An API key, `kiln_<id>_<secret>` (`kiln keys create`). Not needed when the gateway runs with KILN_AUTH=off.",
                ))
                .build(),
        ),
    );
    for (path, item) in doc.paths.paths.iter_mut().filter(|(p, _)| p.starts_with("/v1/")) {
        let schema = if OPENAI_PATHS.contains(&path.as_str()) { "OpenAIError" } else { "Error" };
        let response = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name(schema))).build())
        };
        let challenge = || string_header("");
        let unauthorized = response("unauthorized: no key, or one malformed, unknown, revoked or expired")
            .header("WWW-Authenticate", challenge())
            .build();
        let forbidden = response(
            "forbidden: the key lacks this route's scope (jobs:submit, jobs:read, admin; admin to list another tenant's jobs)",
        )
        .header("WWW-Authenticate", challenge())
        .build();
        let limited = response(
            "rate_limited (the tenant's request rate), quota_exceeded (jobs in flight, compute-seconds per hour)",
        )
        .header("Retry-After", retry_after())
        .header("RateLimit-Policy", string_header("e.g. \"requests\";q=100;w=2"))
        .header("RateLimit", string_header("e.g. \"requests\";r=0;t=1"))
        .build();
        for op in operations(item) {
            op.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
            let responses = &mut op.responses.responses;
            responses.insert("401".into(), RefOr::T(unauthorized.clone()));
            responses.insert("403".into(), RefOr::T(forbidden.clone()));
            responses.insert("429".into(), RefOr::T(limited.clone()));
        }
    }
}

/// `/jobs…` answers as `/v1/jobs…` does (the same handlers and scopes).
fn aliased(doc: &mut utoipa::openapi::OpenApi) {
    let paths = &mut doc.paths.paths;
    let aliases: Vec<(String, PathItem)> = paths
        .iter()
        .filter_map(|(path, item)| {
            let alias = path.strip_prefix("/v1").filter(|p| p.starts_with("/jobs"))?;
            let mut item = item.clone();
            for op in operations(&mut item) {
                op.summary = Some(format!("{} (alias of {path})", op.summary.as_deref().unwrap_or_default()));
                op.operation_id = op.operation_id.as_ref().map(|id| format!("{id}_alias"));
            }
            Some((alias.to_owned(), item))
        })
        .collect();
    paths.extend(aliases);
}

/// The webhooks, as OpenAPI callbacks of the operations that take one (utoipa has no typed
/// callbacks: they are the operation's `callbacks` member, set as raw JSON).
fn callbacks(doc: &mut utoipa::openapi::OpenApi) {
    let json_of = |schema: &str| json!({ "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } });
    let job = json!({ "webhook": { "{$request.body#/webhook}": { "post": {
        "summary": "Job event (Standard Webhooks)",
        "parameters": [
            { "name": "webhook-id", "in": "header", "required": true, "schema": { "type": "string" }, "description": "Stable across retries of one event." },
            { "name": "webhook-timestamp", "in": "header", "required": true, "schema": { "type": "integer" }, "description": "Unix seconds of the event." },
            { "name": "webhook-signature", "in": "header", "required": true, "schema": { "type": "string" },
              "description": "v1,<base64 HMAC-SHA256 of \"{webhook-id}.{webhook-timestamp}.{body}\"> with the whsec_ secret." }
        ],
        "requestBody": { "content": json_of("WebhookPayload") },
        "responses": { "2XX": { "description": "Delivered; anything else is retried with backoff, honouring Retry-After" } }
    } } } });
    let prediction = json!({ "webhook": { "{$request.body#/webhook}": { "post": {
        "summary": "The prediction (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature)",
        "requestBody": { "content": json_of("Prediction") },
        "responses": { "2XX": { "description": "Delivered; anything else is retried with backoff" } }
    } } } });
    for (path, callback) in [
        ("/v1/jobs", job),
        ("/v1/predictions", prediction.clone()),
        ("/v1/models/{owner}/{name}/predictions", prediction),
    ] {
        if let Some(op) = doc.paths.paths.get_mut(path).and_then(|item| item.post.as_mut()) {
            op.extensions.get_or_insert_with(Extensions::default).insert("callbacks".into(), callback);
        }
    }
}

// The bodies the handlers parse by hand (field by field, so that each error names its field):
// their shapes for the document.
// Never built: they are read by the derive only.
#[allow(dead_code)]
mod bodies {
    use kiln_proto::{ApiErrorBody, ErrorCode};
    use serde::Serialize;
    use serde_json::Value;
    use utoipa::ToSchema;

    /// `POST /v1/jobs`.
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    #[schema(example = json!({ "model": "all-minilm-l6-v2", "input": { "texts": ["hello world"] }, "metadata": { "ticket": 42 } }))]
    pub struct JobRequest {
        /// A served model (GET /v1/models).
        model: String,
        /// The model's task input; see GET /v1/models.
        input: Value,
        /// Echoed back on the record; at most 4 KiB.
        #[schema(value_type = Option<Object>)]
        metadata: Option<Value>,
        /// Expire the job if not started within this many seconds.
        #[schema(exclusive_minimum = 0.0)]
        deadline_s: Option<f64>,
        /// Receives signed job events; internal addresses are refused.
        #[schema(format = "uri")]
        webhook: Option<String>,
        /// completed is always sent.
        webhook_events: Option<Vec<JobWebhookEvent>>,
        /// false: never answered from the result cache nor coalesced onto an identical job (default true).
        cache: Option<bool>,
    }

    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum JobWebhookEvent {
        Start,
        Progress,
        Completed,
    }

    /// What a job's webhook receives.
    #[derive(Serialize, ToSchema)]
    pub struct WebhookPayload {
        #[serde(rename = "type")]
        kind: WebhookPayloadType,
        #[schema(format = DateTime)]
        timestamp: String,
        data: kiln_proto::JobRecord,
    }

    #[derive(Serialize, ToSchema)]
    pub enum WebhookPayloadType {
        #[serde(rename = "job.started")]
        Started,
        #[serde(rename = "job.progress")]
        Progress,
        #[serde(rename = "job.completed")]
        Completed,
    }

    /// A page of `GET /v1/jobs`.
    #[derive(Serialize, ToSchema)]
    pub struct JobList {
        data: Vec<kiln_proto::JobRecord>,
        /// Where the next page starts; null after the last.
        next_cursor: Option<String>,
    }

    /// A page of `GET /v1/predictions`, in Replicate's shape.
    #[derive(Serialize, ToSchema)]
    pub struct PredictionList {
        /// Always null: pages go forwards.
        #[schema(value_type = Option<String>)]
        previous: Option<String>,
        /// The absolute URL of the next page (the same query, the next `cursor`); null after the last.
        #[schema(format = "uri")]
        next: Option<String>,
        results: Vec<kiln_proto::Prediction>,
    }

    /// `GET /readyz`.
    #[derive(Serialize, ToSchema)]
    pub struct Readiness {
        status: ReadinessStatus,
        draining: bool,
        checks: ReadinessChecks,
    }

    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum ReadinessStatus {
        Ready,
        NotReady,
    }

    /// broker and store: ok, or a stable word saying why not (the error itself is in the log).
    #[derive(Serialize, ToSchema)]
    pub struct ReadinessChecks {
        broker: String,
        store: String,
    }

    /// `GET /healthz`.
    #[derive(Serialize, ToSchema)]
    pub struct Health {
        #[schema(example = "ok")]
        status: String,
    }

    /// An error of the OpenAI-compatible routes, in OpenAI's shape.
    #[derive(Serialize, ToSchema)]
    pub struct OpenAIError {
        error: OpenAIErrorDetail,
    }

    #[derive(Serialize, ToSchema)]
    pub struct OpenAIErrorDetail {
        message: String,
        #[serde(rename = "type")]
        kind: OpenAIErrorType,
        /// The request field at fault, when one is.
        param: Option<String>,
        /// Kiln's stable error code.
        code: ErrorCode,
    }

    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum OpenAIErrorType {
        InvalidRequestError,
        AuthenticationError,
        PermissionError,
        RateLimitError,
        InsufficientQuota,
        ServerError,
    }

    /// `POST /v1/embeddings` (OpenAI's shape).
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    #[schema(example = json!({ "model": "all-minilm-l6-v2", "input": ["hello world", "goodbye"] }))]
    pub struct EmbeddingsRequest {
        input: EmbeddingsInput,
        /// An embedding model of GET /v1/models.
        model: String,
        /// float (the default): JSON numbers; base64: the little-endian f32 bytes of each vector,
        /// base64-encoded.
        encoding_format: Option<EncodingFormat>,
        /// Only for models whose [embedding] sets matryoshka = true (none served by default): the
        /// vector is cut to this length and normalised again. Elsewhere 422, param dimensions.
        #[schema(minimum = 1)]
        dimensions: Option<u32>,
        /// Accepted and ignored.
        user: Option<String>,
    }

    /// A text or a list of texts (at most the model's limits.max_texts, each at most
    /// limits.max_text_chars). Token ids are refused with 422.
    #[derive(Serialize, ToSchema)]
    #[serde(untagged)]
    pub enum EmbeddingsInput {
        One(String),
        Many(Vec<String>),
    }

    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum EncodingFormat {
        Float,
        Base64,
    }

    #[derive(Serialize, ToSchema)]
    pub struct EmbeddingsResponse {
        #[schema(value_type = String, example = "list")]
        object: &'static str,
        data: Vec<EmbeddingEntry>,
        model: String,
        usage: EmbeddingsUsage,
    }

    #[derive(Serialize, ToSchema)]
    pub struct EmbeddingEntry {
        #[schema(value_type = String, example = "embedding")]
        object: &'static str,
        index: u32,
        embedding: EmbeddingVector,
    }

    /// The vector: JSON numbers, or (encoding_format base64) its little-endian f32 bytes.
    #[derive(Serialize, ToSchema)]
    #[serde(untagged)]
    pub enum EmbeddingVector {
        Float(Vec<f32>),
        Base64(String),
    }

    /// The tokens the model saw (special tokens included, after truncation).
    #[derive(Serialize, ToSchema)]
    pub struct EmbeddingsUsage {
        prompt_tokens: u64,
        total_tokens: u64,
    }

    /// `GET /v1/models`: OpenAI's list shape.
    #[derive(Serialize, ToSchema)]
    pub struct ModelList {
        #[schema(value_type = String, example = "list")]
        object: &'static str,
        data: Vec<ModelEntry>,
    }

    /// A served model: OpenAI's fields and Kiln's description of it.
    #[derive(Serialize, ToSchema)]
    pub struct ModelEntry {
        id: String,
        #[schema(value_type = String, example = "model")]
        object: &'static str,
        /// Always 0: Kiln does not know when a model was made.
        created: u64,
        #[schema(value_type = String, example = "kiln")]
        owned_by: &'static str,
        #[serde(flatten)]
        info: kiln_proto::ModelInfo,
    }

    /// Problem details (RFC 9457) as Replicate's clients read them, next to Kiln's error object.
    #[derive(Serialize, ToSchema)]
    pub struct Problem {
        #[serde(flatten)]
        error: ApiErrorBody,
        title: String,
        status: u16,
        detail: String,
    }

    /// `POST /v1/predictions` (Replicate's shape).
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    #[schema(example = json!({ "version": "kiln/all-minilm-l6-v2", "input": { "texts": ["hello world"] } }))]
    pub struct PredictionRequest {
        /// kiln/<model> or <model>, optionally :<version> (the served one).
        #[schema(example = "kiln/all-minilm-l6-v2")]
        version: String,
        /// The model's task input; see GET /v1/models.
        input: Value,
        /// Receives the prediction, signed (Standard Webhooks); internal addresses are refused.
        #[schema(format = "uri")]
        webhook: Option<String>,
        /// A webhook for the completed event only.
        #[schema(format = "uri")]
        webhook_completed: Option<String>,
        /// Default: all; completed is always sent.
        webhook_events_filter: Option<Vec<PredictionWebhookEvent>>,
        /// Accepted; urls.stream is always given (Kiln's job events).
        stream: Option<bool>,
    }

    /// `POST /v1/models/{owner}/{name}/predictions`: as `POST /v1/predictions`, the model in the path.
    #[derive(Serialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    #[schema(example = json!({ "input": { "texts": ["hello world"] }, "webhook_events_filter": ["completed"] }))]
    pub struct ModelPredictionRequest {
        /// The model's task input; see GET /v1/models.
        input: Value,
        /// Receives the prediction, signed (Standard Webhooks); internal addresses are refused.
        #[schema(format = "uri")]
        webhook: Option<String>,
        /// A webhook for the completed event only.
        #[schema(format = "uri")]
        webhook_completed: Option<String>,
        /// Default: all; completed is always sent.
        webhook_events_filter: Option<Vec<PredictionWebhookEvent>>,
        /// Accepted; urls.stream is always given (Kiln's job events).
        stream: Option<bool>,
    }

    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub enum PredictionWebhookEvent {
        Start,
        Output,
        Logs,
        Completed,
    }
}
