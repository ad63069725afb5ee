//! `GET /v1/jobs` over HTTP on both backends: pages newest first with a cursor that jobs made
//! later never disturb, each filter, one tenant's listing never showing another's jobs (an admin's
//! showing every tenant's, without their webhook URLs), 422s naming the bad parameter, and the
//! unversioned aliases (`/jobs…`) answering as `/v1/jobs…` does, with the same scopes.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use kiln_common::tenancy::{self, Limits, NewKey, Scope};
use kiln_common::testing::Kind;
use kiln_gateway::{AuthMode, GatewayConfig};
use kiln_proto::now_millis;
use serde_json::{Value, json};

use crate::harness::{Env, Gateway, MODEL, TERRAIN};

kiln_common::both_backends!(
    pages_come_newest_first_and_jobs_made_later_stay_out,
    each_filter_narrows_the_listing,
    a_tenant_lists_only_its_own_jobs_and_an_admin_every_tenants,
    bad_listing_parameters_are_json_422s_naming_the_field,
    the_unversioned_aliases_answer_as_v1_does,
);

/// One `GET` with an optional key: status and JSON body.
async fn get(gw: &Gateway, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = gw.http.get(gw.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("GET");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Every page of the listing at `path` (a query string without `cursor`), in order.
async fn all_pages(gw: &Gateway, path: &str, token: Option<&str>) -> Vec<Vec<Value>> {
    pages_from(gw, path, token, None).await
}

/// The pages of the listing at `path` from `cursor` on.
async fn pages_from(gw: &Gateway, path: &str, token: Option<&str>, mut cursor: Option<String>) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}cursor={c}"),
            None => path.to_owned(),
        };
        let (status, body) = get(gw, &url, token).await;
        assert_eq!(status, 200, "GET {url}: {body}");
        pages.push(body["data"].as_array().expect("data").clone());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => {
                assert!(body["next_cursor"].is_null(), "{body}");
                return pages;
            }
        }
        assert!(pages.len() < 100, "the listing at {path} never ends");
    }
}

fn ids(records: &[Value]) -> Vec<String> {
    records.iter().map(|r| r["id"].as_str().expect("id").to_owned()).collect()
}

async fn submit(gw: &Gateway, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut req = gw.http.post(gw.url(path)).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `jobs` in the listing's order: newest first by created_at, and by id within a millisecond (two
/// submissions can share one).
async fn listing_order(gw: &Gateway, token: Option<&str>, jobs: &[String]) -> Vec<String> {
    let mut by_time = Vec::new();
    for id in jobs {
        let (status, job) = get(gw, &format!("/v1/jobs/{id}"), token).await;
        assert_eq!(status, 200, "{job}");
        by_time.push((millis_of(job["created_at"].as_str().unwrap()), id.clone()));
    }
    by_time.sort_by(|a, b| b.cmp(a));
    by_time.into_iter().map(|(_, id)| id).collect()
}

fn millis_of(rfc3339: &str) -> i64 {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339).unwrap();
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn embedding(text: &str) -> Value {
    json!({ "model": MODEL, "input": { "text": text } })
}

async fn pages_come_newest_first_and_jobs_made_later_stay_out(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    // No worker: the jobs stay queued, so each record reads the same in the listing and alone.
    let mut made = Vec::new();
    for i in 0..25 {
        made.push(gw.submit_ok(json!({ "text": format!("listed job {i}") })).await.to_string());
    }
    let made = listing_order(&gw, None, &made).await;
    let (status, first) = get(&gw, "/v1/jobs?limit=10", None).await;
    assert_eq!(status, 200, "{first}");
    let first_page = first["data"].as_array().unwrap().clone();
    assert_eq!(ids(&first_page), made[..10]);
    // Jobs submitted between pages are not in the pages that follow.
    let mut later = Vec::new();
    for i in 0..3 {
        later.push(gw.submit_ok(json!({ "text": format!("submitted between pages {i}") })).await.to_string());
    }
    let cursor = first["next_cursor"].as_str().expect("a next page").to_owned();
    let mut pages = vec![first_page];
    pages.extend(pages_from(&gw, "/v1/jobs?limit=10", None, Some(cursor)).await);
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 10, 5]);
    let listed: Vec<Value> = pages.concat();
    assert_eq!(ids(&listed), made, "every job once, newest first, none of those made later");
    let times: Vec<i64> = listed.iter().map(|r| millis_of(r["created_at"].as_str().unwrap())).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
    // Each record is what GET /v1/jobs/{id} answers for it.
    for record in &listed {
        assert_eq!(*record, gw.job(record["id"].as_str().unwrap().parse().unwrap()).await);
    }
    // A listing begun now has the later jobs too, first.
    let now: Vec<String> = ids(&all_pages(&gw, "/v1/jobs?limit=7", None).await.concat());
    assert_eq!(now.len(), 28);
    assert_eq!(now[3..], made, "the later jobs first");
    assert_eq!(now[..3].iter().collect::<HashSet<_>>(), later.iter().collect::<HashSet<_>>());
    gw.stop().await;
}

async fn each_filter_narrows_the_listing(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    // Without workers: queued embedding jobs, one canceled, and a queued terrain job.
    let queued = gw.submit_ok(json!({ "text": "stays queued" })).await.to_string();
    let canceled = gw.submit_ok(json!({ "text": "is canceled" })).await.to_string();
    let r = gw.post_raw(&format!("/v1/jobs/{canceled}/cancel"), None, Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = gw.submit(&json!({ "model": TERRAIN, "input": { "difficulty": 20, "seed": 3 } })).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let terrain = r.body["id"].as_str().unwrap().to_owned();

    let all = listing_order(&gw, None, &[queued.clone(), canceled.clone(), terrain.clone()]).await;
    let only = |these: &[&String]| all.iter().filter(|id| these.contains(id)).cloned().collect::<Vec<_>>();
    let listed = |query: &str| {
        let (gw, path) = (&gw, format!("/v1/jobs?limit=2&{query}"));
        async move { ids(&all_pages(gw, &path, None).await.concat()) }
    };
    assert_eq!(listed("").await, all);
    assert_eq!(listed("status=canceled").await, only(&[&canceled]));
    assert_eq!(listed("status=queued").await, only(&[&terrain, &queued]));
    assert_eq!(listed("status=succeeded").await, Vec::<String>::new());
    assert_eq!(listed(&format!("model={TERRAIN}")).await, only(&[&terrain]));
    assert_eq!(listed(&format!("model={MODEL}&status=queued")).await, only(&[&queued]));
    assert_eq!(listed("model=not-served-here").await, Vec::<String>::new());
    // created_after: strictly after, as RFC 3339 or unix milliseconds; an empty one is none.
    let created = |job: Value| job["created_at"].as_str().unwrap().to_owned();
    let at = created(gw.job(canceled.parse().unwrap()).await);
    let millis = millis_of(&at);
    let mut expect = Vec::new();
    for id in &all {
        if millis_of(&created(gw.job(id.parse().unwrap()).await)) > millis {
            expect.push(id.clone());
        }
    }
    assert_eq!(listed(&format!("created_after={millis}")).await, expect, "after {at}");
    assert_eq!(listed(&format!("created_after={}", at.replace('+', "%2B"))).await, expect);
    assert_eq!(listed(&format!("created_after={}", millis - 60_000)).await.len(), 3);
    assert_eq!(listed("created_after=&status=").await.len(), 3);
    assert_eq!(listed(&format!("created_after={}", now_millis() + 60_000)).await, Vec::<String>::new());
    gw.stop().await;
}

async fn key(env: &Env, tenant: &str, scopes: &[Scope]) -> String {
    let new = NewKey {
        tenant: tenant.into(),
        scopes: scopes.iter().copied().collect::<BTreeSet<_>>(),
        expires_at: None,
        limits: Limits::default(),
    };
    tenancy::issue(env.backend.keys.as_ref(), new, now_millis()).await.expect("issue a key").token
}

async fn a_tenant_lists_only_its_own_jobs_and_an_admin_every_tenants(kind: Kind) {
    let env = Env::new(kind);
    let hooks = crate::delivery::webhook_gateway(Duration::from_secs(60), Duration::from_secs(60));
    let gw = env.gateway_with(GatewayConfig { auth: AuthMode::Keys, ..hooks }).await;
    const RW: &[Scope] = &[Scope::JobsSubmit, Scope::JobsRead];
    let (a, b, admin) =
        (key(&env, "list-a", RW).await, key(&env, "list-b", RW).await, key(&env, "ops", &[Scope::Admin]).await);
    let submitter = key(&env, "list-a", &[Scope::JobsSubmit]).await;
    let reader = key(&env, "list-a", &[Scope::JobsRead]).await;
    let mut of_a = Vec::new();
    for i in 0..3 {
        let body =
            json!({ "model": MODEL, "input": { "text": format!("a {i}") }, "webhook": "http://127.0.0.1:9/hook" });
        let (status, r) = submit(&gw, "/v1/jobs", Some(&a), &body).await;
        assert_eq!(status, 202, "{r}");
        of_a.push(r["id"].as_str().unwrap().to_owned());
    }
    let mut of_b = Vec::new();
    for i in 0..2 {
        let (status, r) = submit(&gw, "/jobs", Some(&b), &embedding(&format!("b {i}"))).await;
        assert_eq!(status, 202, "{r}");
        of_b.push(r["id"].as_str().unwrap().to_owned());
    }
    let of_a = listing_order(&gw, Some(&admin), &of_a).await;
    let of_b = listing_order(&gw, Some(&admin), &of_b).await;
    let listed = |path: &'static str, token: String| {
        let gw = &gw;
        async move { all_pages(gw, path, Some(&token)).await.concat() }
    };
    let seen_by_a = listed("/v1/jobs?limit=2", a.clone()).await;
    assert_eq!(ids(&seen_by_a), of_a, "tenant a lists its jobs only");
    assert!(seen_by_a.iter().all(|r| r["webhook"]["url"] == "http://127.0.0.1:9/hook"), "its own webhook URLs");
    assert_eq!(ids(&listed("/jobs?limit=2", reader.clone()).await), of_a, "a read-only key of a, on the alias");
    assert_eq!(ids(&listed("/v1/jobs?tenant=list-a", a.clone()).await), of_a);
    assert_eq!(ids(&listed("/v1/jobs", b.clone()).await), of_b, "tenant b lists its jobs only");
    let everyone = listed("/v1/jobs?limit=4", admin.clone()).await;
    let everyone_ids: HashSet<String> = ids(&everyone).into_iter().collect();
    assert_eq!(everyone_ids, of_a.iter().chain(&of_b).cloned().collect(), "an admin lists every tenant's");
    assert!(
        everyone.iter().filter(|r| !r["webhook"].is_null()).all(|r| r["webhook"]["url"] != "http://127.0.0.1:9/hook"),
        "but not their webhook URLs"
    );
    assert_eq!(ids(&listed("/v1/jobs?tenant=list-b", admin.clone()).await), of_b, "or one tenant's");
    // Another tenant's listing is an admin's to ask for; a listing needs jobs:read; and a key.
    let (status, body) = get(&gw, "/v1/jobs?tenant=list-b", Some(&a)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    for path in ["/v1/jobs", "/jobs"] {
        let (status, body) = get(&gw, path, Some(&submitter)).await;
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{path}: {body}");
        assert_eq!(get(&gw, path, None).await.0, 401, "{path} without a key");
    }
    // The aliases' scopes are their /v1 routes': a read-only key submits and cancels nowhere.
    let (status, _) = submit(&gw, "/jobs", Some(&reader), &embedding("no")).await;
    assert_eq!(status, 403);
    let (status, _) = submit(&gw, &format!("/jobs/{}/cancel", of_a[0]), Some(&reader), &json!({})).await;
    assert_eq!(status, 403);
    let (status, _) = get(&gw, &format!("/jobs/{}", of_a[0]), Some(&submitter)).await;
    assert_eq!(status, 403, "reading a job on the alias needs jobs:read");
    // Another tenant's job does not exist on the alias either.
    assert_eq!(get(&gw, &format!("/jobs/{}", of_a[0]), Some(&b)).await.0, 404);
    gw.stop().await;
}

async fn bad_listing_parameters_are_json_422s_naming_the_field(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    gw.submit_ok(json!({ "text": "one job, so there is a page" })).await;
    let (_, page) = get(&gw, "/v1/jobs?limit=1", None).await;
    assert_eq!(page["data"].as_array().map(Vec::len), Some(1), "{page}");
    use base64::Engine;
    let b64 = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
    let forged = b64("c1.12.not-an-id.3");
    for (query, field) in [
        ("status=done", "status"),
        ("status=QUEUED", "status"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("created_after=yesterday", "created_after"),
        ("created_after=2026-13-01T00:00:00Z", "created_after"),
        ("created_after=99999999999999999999999", "created_after"),
        ("model=Not%20A%20Model", "model"),
        ("cursor=not-a-cursor!", "cursor"),
        (&format!("cursor={forged}"), "cursor"),
        ("tenant=a%3Ab", "tenant"),
        ("limit=1&limit=2", "query"),
        ("status=%FF", "status"),
    ] {
        for prefix in ["/v1/jobs", "/jobs"] {
            let uri = format!("{prefix}?{query}");
            let resp = gw.http.get(gw.url(&uri)).send().await.unwrap();
            let (status, ct) = (resp.status().as_u16(), resp.headers()["content-type"].to_str().unwrap().to_owned());
            let body: Value = resp.json().await.unwrap();
            assert_eq!((status, ct.as_str()), (422, "application/json"), "{uri}: {body}");
            assert_eq!(body["error"]["code"], "invalid_request", "{uri}: {body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.starts_with(&format!("{field}:")), "{uri} names {field}: {message}");
        }
    }
    gw.stop().await;
}

async fn the_unversioned_aliases_answer_as_v1_does(kind: Kind) {
    let env = Env::new(kind);
    let gw = env.gateway().await;
    let worker = env.worker();
    let timeout = Duration::from_secs(120);
    // Submitted on the alias, read on /v1; and the other way round.
    let (status, via_alias) = submit(&gw, "/jobs", None, &embedding("submitted without a version")).await;
    assert_eq!(status, 202, "{via_alias}");
    let alias_id = via_alias["id"].as_str().unwrap().to_owned();
    let r = gw.submit(&embedding("submitted on v1")).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.headers["location"], format!("/v1/jobs/{}", r.body["id"].as_str().unwrap()));
    let v1_id = r.body["id"].as_str().unwrap().to_owned();
    let done = gw.finished(alias_id.parse().unwrap(), timeout).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    gw.finished(v1_id.parse().unwrap(), timeout).await;
    for id in [&alias_id, &v1_id] {
        let (v1, alias) =
            (get(&gw, &format!("/v1/jobs/{id}"), None).await, get(&gw, &format!("/jobs/{id}"), None).await);
        assert_eq!(v1, alias, "GET /jobs/{id} answers as /v1 does");
        assert_eq!(alias.1["status"], "succeeded");
        // The event stream of a finished job ends with its completion.
        let events = gw.http.get(gw.url(&format!("/jobs/{id}/events"))).send().await.unwrap();
        assert_eq!(events.status(), 200);
        assert!(events.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let text =
            tokio::time::timeout(Duration::from_secs(30), events.text()).await.expect("the stream ends").unwrap();
        assert!(text.contains("event: completed"), "{text}");
        // Cancel and outputs: the same errors.
        for (method, path) in
            [("POST", format!("/jobs/{id}/cancel")), ("GET", format!("/jobs/{id}/outputs/image-0.png"))]
        {
            let ask = |p: String| gw.http.request(method.parse().unwrap(), gw.url(&p)).send();
            let (alias, v1) = (ask(path.clone()).await.unwrap(), ask(format!("/v1{path}")).await.unwrap());
            let (sa, sv) = (alias.status().as_u16(), v1.status().as_u16());
            let (ba, bv): (Value, Value) = (alias.json().await.unwrap(), v1.json().await.unwrap());
            assert_eq!((sa, &ba["error"]["code"]), (sv, &bv["error"]["code"]), "{method} {path}: {ba} vs {bv}");
            assert!(sa == 409 || sa == 404, "{method} {path}: {sa} {ba}");
        }
    }
    // Both listings list both, the same.
    let (v1, alias) = (get(&gw, "/v1/jobs", None).await, get(&gw, "/jobs", None).await);
    assert_eq!(v1, alias);
    assert_eq!(ids(v1.1["data"].as_array().unwrap()), listing_order(&gw, None, &[v1_id, alias_id]).await);
    worker.stop().await;
    gw.stop().await;
}
