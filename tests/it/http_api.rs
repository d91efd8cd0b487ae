//! The HTTP/JSON API through the real gateway (`http_listen`), with a plain HTTP/1.1 client:
//! SendBatch in JSON delivered to the mock APNs, the gRPC errors as HTTP statuses with the field
//! named, the same keys and per-app authorization as gRPC, receipts as SSE and NDJSON (with the
//! Redis cursor and `Last-Event-ID`), the body limit, `/healthz`, and the OpenAPI document: the
//! served one equals `docs/openapi.json`, and the JSON the server produced conforms to it.

use crate::harness::{self, MoreApp, Options, recipient, template};

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use pushgate::proto;
use pushgate_mocks::redis_server::RedisServer;
use serde_json::{Value, json};

const SHOP_KEY: &str = "shop-http-key-0123456789";
const NEWS_KEY: &str = "news-http-key-0123456789";

/// One HTTP/1.1 request on a fresh connection: status, content type and body.
struct Reply {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> hyper::Response<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    sender.send_request(request).await.unwrap()
}

async fn read(response: hyper::Response<hyper::body::Incoming>) -> Reply {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply {
        status,
        content_type,
        body,
    }
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("authorization", auth.as_str()));
    }
    let body = body.map(|b| serde_json::to_vec(&b).unwrap());
    read(send_request(addr, method, path, &headers, body).await).await
}

fn batch_json(ids: std::ops::Range<u64>) -> Value {
    json!({
        "campaign_id": "spring",
        "wait_for_receipts": true,
        "template": {"title": "Hi {{ name | default: \"there\" }}", "ttl_seconds": 600},
        "recipients": ids.map(|n| json!({
            "message_id": format!("m-{n}"),
            "platform": "APNS",
            "device_token": harness::token(n),
            "vars": {"name": format!("user {n}")},
            "user_id": format!("u-{n}"),
        })).collect::<Vec<_>>(),
    })
}

async fn start(redis: Option<&RedisServer>) -> harness::Harness {
    harness::start(Options {
        top: "http_listen = \"127.0.0.1:0\"\nhttp_max_body_bytes = 200000".into(),
        api_keys: vec![SHOP_KEY.into()],
        more_apps: vec![MoreApp {
            id: "news".into(),
            api_keys: vec![NEWS_KEY.into()],
            ..Default::default()
        }],
        extra: redis
            .map(|r| format!("[redis]\nurl = \"{}\"", r.url()))
            .unwrap_or_default(),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn send_batch_over_http_delivers_and_answers_in_proto_json() {
    let h = start(None).await;
    let addr = h.gateway.http_addr.expect("http_listen is set");
    let reply = call(
        addr,
        "POST",
        "/v1/apps/shop/batches",
        Some(SHOP_KEY),
        Some(batch_json(0..20)),
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.content_type, "application/json");
    let body = reply.json();
    assert_eq!(body["accepted"], 20);
    assert_eq!(body["rejected"], 0);
    let receipts = body["receipts"].as_array().unwrap();
    assert_eq!(receipts.len(), 20);
    for r in receipts {
        assert_eq!(r["status"], "DELIVERED", "{r}");
        assert_eq!(r["app_id"], "shop");
        assert_eq!(r["campaign_id"], "spring");
        assert_eq!(r["platform"], "APNS");
        // proto3 JSON: 64-bit integers are strings.
        assert!(r["accepted_at_ms"].is_string(), "{r}");
    }
    let mut tokens: Vec<String> = h
        .mock
        .accepted()
        .into_iter()
        .map(|a| a.device_token)
        .collect();
    tokens.sort();
    let mut expected: Vec<String> = (0..20).map(harness::token).collect();
    expected.sort();
    assert_eq!(tokens, expected, "each recipient delivered once");
    let payloads = h.mock.accepted();
    assert!(
        payloads
            .iter()
            .any(|a| a.payload.to_string().contains("Hi user 3")),
        "template rendered per recipient"
    );
    check_against_openapi(&body, "SendBatchResponse");
    assert_eq!(h.unresolved_drops(), 0);
}

#[tokio::test]
async fn errors_map_to_http_statuses_and_name_the_field() {
    let h = start(None).await;
    let addr = h.gateway.http_addr.unwrap();
    let path = "/v1/apps/shop/batches";
    // Same keys and the same authorization as gRPC.
    let no_key = call(addr, "POST", path, None, Some(batch_json(0..1))).await;
    assert_eq!(no_key.status, 401);
    assert_eq!(no_key.json()["error"]["status"], "UNAUTHENTICATED");
    let bad_key = call(
        addr,
        "POST",
        path,
        Some("not-a-key-0123456789"),
        Some(batch_json(0..1)),
    )
    .await;
    assert_eq!(bad_key.status, 401);
    let other_app = call(
        addr,
        "POST",
        "/v1/apps/news/batches",
        Some(SHOP_KEY),
        Some(batch_json(0..1)),
    )
    .await;
    let unknown_app = call(
        addr,
        "POST",
        "/v1/apps/nope/batches",
        Some(SHOP_KEY),
        Some(batch_json(0..1)),
    )
    .await;
    assert_eq!(other_app.status, 403);
    assert_eq!(
        other_app.json(),
        unknown_app.json(),
        "one answer for not-yours and unknown"
    );
    assert_eq!(other_app.json()["error"]["field"], "app_id");
    assert!(!String::from_utf8_lossy(&other_app.body).contains("news"));
    let news = call(
        addr,
        "POST",
        "/v1/apps/news/batches",
        Some(NEWS_KEY),
        Some(batch_json(100..101)),
    )
    .await;
    assert_eq!(news.status, 200, "{}", String::from_utf8_lossy(&news.body));

    // Decoding errors name the field.
    let mut bad = batch_json(0..2);
    bad["recipients"][1]["platform"] = json!("PIGEON");
    let reply = call(addr, "POST", path, Some(SHOP_KEY), Some(bad)).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["field"], "recipients[1].platform");
    let reply = call(
        addr,
        "POST",
        path,
        Some(SHOP_KEY),
        Some(json!({"recipientz": []})),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("recipientz")
    );
    // Validation errors of the service itself, as gRPC gives them (BadRequest violations).
    let reply = call(
        addr,
        "POST",
        path,
        Some(SHOP_KEY),
        Some(json!({"template": {"title": "x"}})),
    )
    .await;
    assert_eq!(reply.status, 400);
    let error = reply.json();
    assert_eq!(error["error"]["status"], "INVALID_ARGUMENT");
    assert_eq!(error["error"]["field"], "recipients", "{error}");
    check_against_openapi(&error, "Error");
    // Far over the batch cap (10,000 here): refused from a count of the JSON array, before
    // the recipients are decoded.
    let flood = json!({"template": {"title": "x"}, "recipients": vec![json!({}); 20_001]});
    let reply = call(addr, "POST", path, Some(SHOP_KEY), Some(flood)).await;
    assert_eq!(reply.status, 400);
    let error = reply.json();
    assert_eq!(error["error"]["field"], "recipients", "{error}");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("refused before decoding"), "{error}");
    let mut unspecified = batch_json(0..1);
    unspecified["recipients"][0]["platform"] = json!("PLATFORM_UNSPECIFIED");
    let reply = call(addr, "POST", path, Some(SHOP_KEY), Some(unspecified)).await;
    assert_eq!(reply.json()["error"]["field"], "recipients[0].platform");
    // A recipient-level problem rejects only that recipient, in the 200 answer.
    let mut one_bad = batch_json(0..2);
    one_bad["recipients"][0]["device_token"] = json!("xyz");
    let reply = call(addr, "POST", path, Some(SHOP_KEY), Some(one_bad)).await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(
        (body["accepted"].clone(), body["rejected"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(body["results"][0]["field"], "recipients[0].device_token");
    check_against_openapi(&body, "SendBatchResponse");
    // app_id in the body must agree with the path.
    let mut mismatched = batch_json(0..1);
    mismatched["app_id"] = json!("news");
    let reply = call(addr, "POST", path, Some(SHOP_KEY), Some(mismatched)).await;
    assert_eq!(
        (reply.status, reply.json()["error"]["field"].clone()),
        (400, json!("app_id"))
    );

    // Transport-level refusals, in the same error shape.
    let reply = read(
        send_request(
            addr,
            "POST",
            path,
            &[
                ("content-type", "text/plain"),
                ("authorization", &format!("Bearer {SHOP_KEY}")),
            ],
            Some(b"{}".to_vec()),
        )
        .await,
    )
    .await;
    assert_eq!(reply.status, 415);
    check_against_openapi(&reply.json(), "Error");
    let reply = call(
        addr,
        "POST",
        path,
        Some(SHOP_KEY),
        Some(batch_json(0..2000)),
    )
    .await;
    assert_eq!(reply.status, 413, "over http_max_body_bytes");
    check_against_openapi(&reply.json(), "Error");
    let reply = call(addr, "GET", "/v1/nothing", Some(SHOP_KEY), None).await;
    assert_eq!(reply.status, 404);
    let reply = read(
        send_request(
            addr,
            "POST",
            path,
            &[
                ("content-type", "application/json"),
                ("authorization", &format!("Bearer {SHOP_KEY}")),
            ],
            Some(b"{\"template\": ".to_vec()),
        )
        .await,
    )
    .await;
    assert_eq!(reply.status, 400, "truncated JSON");

    let health = call(addr, "GET", "/healthz", None, None).await;
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "SERVING"}))
    );
    assert_eq!(h.unresolved_drops(), 0);
}

/// Parses an SSE body into (event, id, data) triples.
fn sse_events(body: &[u8]) -> Vec<(String, String, String)> {
    let text = String::from_utf8_lossy(body);
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !event.is_empty() {
            out.push((event, id, data));
        }
    }
    out
}

#[tokio::test]
async fn receipts_stream_as_sse_and_ndjson() {
    let h = start(None).await;
    let addr = h.gateway.http_addr.unwrap();
    let auth = format!("Bearer {SHOP_KEY}");
    // Another tenant's receipts are refused before any stream starts.
    let denied = call(addr, "GET", "/v1/apps/news/receipts", Some(SHOP_KEY), None).await;
    assert_eq!(denied.status, 403);
    let bad = call(
        addr,
        "GET",
        "/v1/apps/shop/receipts?limit=zero",
        Some(SHOP_KEY),
        None,
    )
    .await;
    assert_eq!(
        (bad.status, bad.json()["error"]["field"].clone()),
        (400, json!("limit"))
    );

    let sse = send_request(
        addr,
        "GET",
        "/v1/apps/shop/receipts?limit=10&campaign_id=spring",
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(sse.status(), 200);
    let ndjson = send_request(
        addr,
        "GET",
        "/v1/apps/shop/receipts?limit=10",
        &[("authorization", &auth), ("accept", "application/x-ndjson")],
        None,
    )
    .await;
    // Subscribed (the handler subscribes before answering): now send over gRPC.
    let mut client = h.client().await;
    let mut request = tonic::Request::new(proto::SendBatchRequest {
        app_id: "shop".into(),
        campaign_id: "spring".into(),
        template: Some(template("Hi", "")),
        recipients: (0..10).map(|n| recipient(n, &[])).collect(),
        wait_for_receipts: true,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", auth.parse().unwrap());
    client.send_batch(request).await.unwrap();

    let sse = read(sse).await;
    assert!(
        sse.content_type.starts_with("text/event-stream"),
        "{}",
        sse.content_type
    );
    let events = sse_events(&sse.body);
    assert_eq!(events.len(), 10, "{}", String::from_utf8_lossy(&sse.body));
    for (event, id, data) in &events {
        assert_eq!(event, "receipt");
        assert!(id.is_empty(), "no cursor without resume_after");
        let receipt: Value = serde_json::from_str(data).unwrap();
        assert_eq!(receipt["status"], "DELIVERED");
        check_against_openapi(&receipt, "Receipt");
    }
    let ndjson = read(ndjson).await;
    assert_eq!(ndjson.content_type, "application/x-ndjson");
    let lines: Vec<Value> = String::from_utf8_lossy(&ndjson.body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    assert!(lines.iter().all(|r| r["terminal"] == json!(true)));

    // Bounded by time too: nothing more comes, the response ends.
    let idle = call(
        addr,
        "GET",
        "/v1/apps/shop/receipts?wait_seconds=1",
        Some(SHOP_KEY),
        None,
    )
    .await;
    assert_eq!(idle.status, 200);
    assert!(sse_events(&idle.body).is_empty());
}

#[tokio::test]
async fn receipts_resume_from_a_cursor_and_last_event_id() {
    let mut redis = RedisServer::start();
    let h = start(Some(&redis)).await;
    let addr = h.gateway.http_addr.unwrap();
    let reply = call(
        addr,
        "POST",
        "/v1/apps/shop/batches",
        Some(SHOP_KEY),
        Some(batch_json(0..6)),
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    // From the oldest kept: six terminal receipts, each with its cursor as the event id.
    let all = call(
        addr,
        "GET",
        "/v1/apps/shop/receipts?resume_after=0&limit=6",
        Some(SHOP_KEY),
        None,
    )
    .await;
    let events = sse_events(&all.body);
    assert_eq!(events.len(), 6, "{}", String::from_utf8_lossy(&all.body));
    assert!(events.iter().all(|(_, id, _)| !id.is_empty()));
    let ids: Vec<String> = events
        .iter()
        .map(|(_, _, d)| {
            serde_json::from_str::<Value>(d).unwrap()["message_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // An EventSource reconnecting after the third: Last-Event-ID wins over the query.
    let auth = format!("Bearer {SHOP_KEY}");
    let resumed = read(
        send_request(
            addr,
            "GET",
            "/v1/apps/shop/receipts?resume_after=0&limit=3",
            &[("authorization", &auth), ("last-event-id", &events[2].1)],
            None,
        )
        .await,
    )
    .await;
    let rest: Vec<String> = sse_events(&resumed.body)
        .iter()
        .map(|(_, _, d)| {
            serde_json::from_str::<Value>(d).unwrap()["message_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(rest, ids[3..].to_vec(), "no gap, nothing twice");
    let bad = call(
        addr,
        "GET",
        "/v1/apps/shop/receipts?resume_after=not-a-cursor",
        Some(SHOP_KEY),
        None,
    )
    .await;
    assert_eq!(
        (bad.status, bad.json()["error"]["field"].clone()),
        (400, json!("resume_after"))
    );

    // Redis away: /healthz turns 503 and sends are UNAVAILABLE (503), as on gRPC; then back.
    redis.stop();
    wait_healthz(addr, 503).await;
    let refused = call(
        addr,
        "POST",
        "/v1/apps/shop/batches",
        Some(SHOP_KEY),
        Some(batch_json(10..11)),
    )
    .await;
    assert_eq!(
        refused.status,
        503,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.json()["error"]["status"], "UNAVAILABLE");
    check_against_openapi(&refused.json(), "Error");
    redis.restart();
    wait_healthz(addr, 200).await;
    let again = call(
        addr,
        "POST",
        "/v1/apps/shop/batches",
        Some(SHOP_KEY),
        Some(batch_json(20..21)),
    )
    .await;
    assert_eq!(again.status, 200);
}

/// Polls `/healthz` until it answers `status` (at most 20 s).
async fn wait_healthz(addr: SocketAddr, status: u16) {
    for _ in 0..200 {
        if call(addr, "GET", "/healthz", None, None).await.status == status {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("/healthz never answered {status}");
}

#[tokio::test]
async fn openapi_document_is_served_and_kept_in_the_repository() {
    let h = start(None).await;
    let addr = h.gateway.http_addr.unwrap();
    let served = call(addr, "GET", "/openapi.json", None, None).await;
    assert_eq!(served.status, 200);
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    if std::env::var_os("PUSHGATE_UPDATE_OPENAPI").is_some() {
        std::fs::write(&file, &served.body).unwrap();
    }
    let kept = std::fs::read(&file).unwrap_or_default();
    assert!(
        kept == served.body,
        "docs/openapi.json differs from the document the gateway serves (the protobuf messages \
         changed?): regenerate it with `PUSHGATE_UPDATE_OPENAPI=1 cargo test --test it \
         http_api::openapi`"
    );
    let doc = served.json();
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/v1/apps/{app_id}/batches",
        "/v1/apps/{app_id}/receipts",
        "/healthz",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path}");
    }
}

/// Checks `value` against the named schema of the served document (the subset of JSON Schema
/// the document uses: type, properties, additionalProperties, required, items, enum, pattern,
/// minimum/maximum, allOf, $ref), panicking with the JSON path of the first mismatch.
fn check_against_openapi(value: &Value, schema: &str) {
    // The committed document; `openapi_document_is_served_and_kept_in_the_repository` ties it to the server.
    static DOC: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
        let text = std::fs::read_to_string(&file).unwrap();
        serde_json::from_str(&text).unwrap()
    });
    let doc = &*DOC;
    let schema = json!({"$ref": format!("#/components/schemas/{schema}")});
    if let Err(e) = conforms(doc, &schema, value, "$") {
        panic!("response does not match docs/openapi.json: {e}\n{value:#}");
    }
}

fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("{at}: dangling $ref {reference}"));
        }
        return conforms(doc, target, value, at);
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            conforms(doc, s, value, at)?;
        }
    }
    if let Some(kind) = schema.get("type").and_then(Value::as_str) {
        let ok = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            _ => false,
        };
        if !ok {
            return Err(format!("{at}: expected {kind}, got {value}"));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {options:?}"));
    }
    if let (Some(pattern), Some(s)) = (
        schema.get("pattern").and_then(Value::as_str),
        value.as_str(),
    ) {
        // The document's patterns are all "digits, maybe signed".
        let digits = s
            .strip_prefix('-')
            .filter(|_| pattern.starts_with("^-?"))
            .unwrap_or(s);
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("{at}: {s:?} does not match {pattern}"));
        }
    }
    if let Some(n) = value.as_f64()
        && (schema
            .get("minimum")
            .and_then(Value::as_f64)
            .is_some_and(|m| n < m)
            || schema
                .get("maximum")
                .and_then(Value::as_f64)
                .is_some_and(|m| n > m))
    {
        return Err(format!("{at}: {n} out of range"));
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        for required in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = required.as_str().unwrap_or("");
            if !object.contains_key(name) {
                return Err(format!("{at}: required {name} missing"));
            }
        }
        for (key, v) in object {
            let path = format!("{at}.{key}");
            match (
                properties.and_then(|p| p.get(key)),
                schema.get("additionalProperties"),
            ) {
                (Some(s), _) => conforms(doc, s, v, &path)?,
                (None, Some(Value::Bool(false))) => {
                    return Err(format!("{path}: not in the schema"));
                }
                (None, Some(s @ Value::Object(_))) => conforms(doc, s, v, &path)?,
                (None, _) => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            conforms(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// `s` with every byte but letters and digits percent-encoded, for a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The body of an answer that must be 200, checked against its schema in the document.
fn ok_json(reply: &Reply, schema: &str) -> Value {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json();
    check_against_openapi(&body, schema);
    body
}

/// An error answer: its status and the field it names, the body checked against `Error`.
fn error_of(reply: &Reply) -> (u16, String) {
    let body = reply.json();
    check_against_openapi(&body, "Error");
    (
        reply.status,
        body["error"]["field"].as_str().unwrap_or("").to_string(),
    )
}

/// PushGatewayPolicy over HTTP (in memory): dead tokens listed and resumed from `next_after`,
/// opt-out set (its sends DROPPED `opted_out`) and cleared, a user forgotten, scheduled sends
/// cancelled; each route refuses a missing key (401), another tenant's app (403 `app_id`) and a
/// malformed parameter or body naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_routes_over_http() {
    let h = start(None).await;
    let addr = h.gateway.http_addr.unwrap();
    for n in 1..4 {
        h.mock
            .faults()
            .add_unregistered(&harness::token(n), Some(1_700_000_000_000));
    }
    let sent = call(
        addr,
        "POST",
        "/v1/apps/shop/batches",
        Some(SHOP_KEY),
        Some(batch_json(1..5)),
    )
    .await;
    assert_eq!(sent.status, 200);
    let tokens = "/v1/apps/shop/invalid-tokens";
    let mut page = Value::Null;
    for _ in 0..200 {
        page = ok_json(
            &call(addr, "GET", tokens, Some(SHOP_KEY), None).await,
            "InvalidTokensPage",
        );
        if page["invalid_tokens"].as_array().unwrap().len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let all = page["invalid_tokens"].as_array().unwrap().clone();
    assert_eq!(all.len(), 3, "{page}");
    assert_eq!(all[0]["invalid_since_ms"], "1700000000000");
    let first = ok_json(
        &call(
            addr,
            "GET",
            &format!("{tokens}?limit=1"),
            Some(SHOP_KEY),
            None,
        )
        .await,
        "InvalidTokensPage",
    );
    assert_eq!(first["invalid_tokens"].as_array().unwrap()[..], all[..1]);
    let after = first["next_after"].as_str().unwrap();
    let rest = ok_json(
        &call(
            addr,
            "GET",
            &format!("{tokens}?after={}", encode(after)),
            Some(SHOP_KEY),
            None,
        )
        .await,
        "InvalidTokensPage",
    );
    assert_eq!(rest["invalid_tokens"].as_array().unwrap()[..], all[1..]);
    for (query, field) in [
        ("limit=many", "limit"),
        ("after=nonsense", "after"),
        ("cursor=1", "cursor"),
    ] {
        let reply = call(
            addr,
            "GET",
            &format!("{tokens}?{query}"),
            Some(SHOP_KEY),
            None,
        )
        .await;
        assert_eq!(error_of(&reply), (400, field.to_string()), "{query}");
    }

    // Opt-out: set, idempotent, honoured by a send, cleared.
    let opt_out = "/v1/apps/shop/users/u-7/opt-out";
    let set = ok_json(
        &call(addr, "POST", opt_out, Some(SHOP_KEY), None).await,
        "OptOutResponse",
    );
    assert_eq!(set["changed"], true);
    let again = ok_json(
        &call(addr, "POST", opt_out, Some(SHOP_KEY), None).await,
        "OptOutResponse",
    );
    assert_eq!(again["changed"], false);
    let dropped = call(
        addr,
        "POST",
        "/v1/apps/shop/batches",
        Some(SHOP_KEY),
        Some(batch_json(7..8)),
    )
    .await
    .json();
    assert_eq!(dropped["receipts"][0]["status"], "DROPPED", "{dropped}");
    assert_eq!(dropped["receipts"][0]["reason"], "opted_out", "{dropped}");
    let reply = call(
        addr,
        "POST",
        "/v1/apps/shop/users/%FF/opt-out",
        Some(SHOP_KEY),
        None,
    )
    .await;
    assert_eq!(error_of(&reply), (400, "user_id".to_string()), "not UTF-8");
    let cleared = ok_json(
        &call(addr, "DELETE", opt_out, Some(SHOP_KEY), None).await,
        "OptOutResponse",
    );
    assert_eq!(cleared["changed"], true);

    // ForgetUser.
    ok_json(
        &call(addr, "POST", opt_out, Some(SHOP_KEY), None).await,
        "OptOutResponse",
    );
    let forgotten = ok_json(
        &call(
            addr,
            "DELETE",
            "/v1/apps/shop/users/u-7",
            Some(SHOP_KEY),
            None,
        )
        .await,
        "ForgetUserResponse",
    );
    assert_eq!(forgotten["opt_out_erased"], true, "{forgotten}");

    // CancelScheduled: a campaign sent for an hour from now, cancelled before it goes.
    let mut later = batch_json(20..23);
    later["campaign_id"] = json!("later");
    later["wait_for_receipts"] = json!(false);
    later["send_at_ms"] = json!(
        (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            + 3_600_000)
            .to_string()
    );
    let scheduled = call(
        addr,
        "POST",
        "/v1/apps/shop/batches",
        Some(SHOP_KEY),
        Some(later),
    )
    .await;
    assert_eq!(
        scheduled.json()["accepted"],
        3,
        "{}",
        String::from_utf8_lossy(&scheduled.body)
    );
    let cancel = "/v1/apps/shop/scheduled/cancel";
    let cancelled = ok_json(
        &call(
            addr,
            "POST",
            cancel,
            Some(SHOP_KEY),
            Some(json!({"campaign_id": "later"})),
        )
        .await,
        "CancelScheduledResponse",
    );
    assert_eq!(cancelled["cancelled"], "3", "{cancelled}");
    let reply = call(
        addr,
        "POST",
        cancel,
        Some(SHOP_KEY),
        Some(json!({"message_ids": "m-1"})),
    )
    .await;
    assert_eq!(error_of(&reply), (400, "message_ids".to_string()));
    let reply = call(
        addr,
        "POST",
        cancel,
        Some(SHOP_KEY),
        Some(json!({"app_id": "news", "campaign_id": "later"})),
    )
    .await;
    assert_eq!(error_of(&reply), (400, "app_id".to_string()));

    // The same keys and per-app authorization as gRPC, on every route.
    for (method, path, body) in [
        ("GET", "/v1/apps/{app}/invalid-tokens", None),
        ("POST", "/v1/apps/{app}/users/u-1/opt-out", None),
        ("DELETE", "/v1/apps/{app}/users/u-1/opt-out", None),
        ("DELETE", "/v1/apps/{app}/users/u-1", None),
        (
            "POST",
            "/v1/apps/{app}/scheduled/cancel",
            Some(json!({"campaign_id": "x"})),
        ),
    ] {
        let shop = path.replace("{app}", "shop");
        let reply = call(addr, method, &shop, None, body.clone()).await;
        assert_eq!(error_of(&reply).0, 401, "{method} {shop}");
        let news = path.replace("{app}", "news");
        let reply = call(addr, method, &news, Some(SHOP_KEY), body.clone()).await;
        assert_eq!(
            error_of(&reply),
            (403, "app_id".to_string()),
            "{method} {news}"
        );
    }
    assert_eq!(h.unresolved_drops(), 0);
}

/// PushGatewayInsights over HTTP: TrackEvents counts an open of a delivered message once, and
/// GetCampaignStats reports it; a missing key is 401, another tenant's app 403 `app_id`, an event
/// without its id 400 `events[0].event_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insights_routes_over_http() {
    let h = start(None).await;
    let addr = h.gateway.http_addr.unwrap();
    let sent = call(
        addr,
        "POST",
        "/v1/apps/shop/batches",
        Some(SHOP_KEY),
        Some(batch_json(0..4)),
    )
    .await;
    assert_eq!(sent.json()["accepted"], 4);
    let events = "/v1/apps/shop/events";
    let open = json!({"events": [{"event_id": "open-1", "type": "OPEN", "message_id": "m-1"}]});
    let tracked = ok_json(
        &call(addr, "POST", events, Some(SHOP_KEY), Some(open.clone())).await,
        "TrackEventsResponse",
    );
    assert_eq!(tracked["counted"], 1, "{tracked}");
    assert_eq!(tracked["results"][0]["campaign_id"], "spring");
    let repeat = ok_json(
        &call(addr, "POST", events, Some(SHOP_KEY), Some(open.clone())).await,
        "TrackEventsResponse",
    );
    assert_eq!(repeat["counted"], 0, "the same event id counts once");
    let stats = "/v1/apps/shop/campaigns/spring/stats";
    let body = ok_json(
        &call(addr, "GET", stats, Some(SHOP_KEY), None).await,
        "CampaignStats",
    );
    assert_eq!(body["campaign_id"], "spring");
    let variants = body["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 1, "{body}");
    assert_eq!(
        (
            variants[0]["delivered"].clone(),
            variants[0]["opens"].clone()
        ),
        (json!("4"), json!("1")),
        "{body}"
    );

    let no_id = json!({"events": [{"type": "OPEN", "message_id": "m-1"}]});
    let reply = call(addr, "POST", events, Some(SHOP_KEY), Some(no_id)).await;
    assert_eq!(error_of(&reply), (400, "events[0].event_id".to_string()));
    let reply = call(
        addr,
        "GET",
        &format!("{stats}?controll=a"),
        Some(SHOP_KEY),
        None,
    )
    .await;
    assert_eq!(error_of(&reply), (400, "controll".to_string()));
    for (method, path, body) in [
        ("POST", "/v1/apps/{app}/events", Some(open.clone())),
        ("GET", "/v1/apps/{app}/campaigns/spring/stats", None),
    ] {
        let shop = path.replace("{app}", "shop");
        assert_eq!(
            error_of(&call(addr, method, &shop, None, body.clone()).await).0,
            401
        );
        let news = path.replace("{app}", "news");
        let reply = call(addr, method, &news, Some(SHOP_KEY), body.clone()).await;
        assert_eq!(
            error_of(&reply),
            (403, "app_id".to_string()),
            "{method} {news}"
        );
    }
}

/// PushGatewayAdmin over HTTP with Redis: a dead letter listed, replayed (delivered on its
/// second life) and purged; the admin scope is required (an app's send key is 403), and a bad
/// `limit` is 400 naming it. Without Redis the routes answer 501.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_over_http() {
    const ADMIN: &str = "shop-http-admin-0123456789";
    let memory = start(None).await;
    let reply = call(
        memory.gateway.http_addr.unwrap(),
        "GET",
        "/v1/apps/shop/dead-letters",
        Some(SHOP_KEY),
        None,
    )
    .await;
    assert_eq!(error_of(&reply).0, 501);
    memory.gateway.shutdown().await.unwrap();

    let redis = RedisServer::start();
    let h = harness::start(Options {
        top: "http_listen = \"127.0.0.1:0\"".into(),
        api_keys: vec![SHOP_KEY.into()],
        admin_keys: vec![ADMIN.into()],
        more_apps: vec![MoreApp {
            id: "news".into(),
            api_keys: vec![NEWS_KEY.into()],
            ..Default::default()
        }],
        retry: "base_ms = 5\ncap_ms = 20\nmax_attempts = 2".into(),
        extra: format!("[redis]\nurl = \"{}\"\npoll_ms = 20", redis.url()),
        ..Default::default()
    })
    .await;
    let addr = h.gateway.http_addr.unwrap();
    // Every attempt fails with 503: after two attempts each message is a dead letter.
    h.mock.faults().set_unavailable_per_mille(1_000);
    let sent = call(
        addr,
        "POST",
        "/v1/apps/shop/batches",
        Some(SHOP_KEY),
        Some(batch_json(0..2)),
    )
    .await;
    let sent = sent.json();
    for receipt in sent["receipts"].as_array().unwrap() {
        assert_eq!(receipt["status"], "FAILED", "{sent}");
    }
    let letters = "/v1/apps/shop/dead-letters";
    let mut listed = Value::Null;
    for _ in 0..200 {
        listed = ok_json(
            &call(addr, "GET", letters, Some(ADMIN), None).await,
            "ListDeadLettersResponse",
        );
        if listed["total"] == "2" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(listed["total"], "2", "{listed}");
    let mut ids: Vec<&str> = listed["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["message_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["m-0", "m-1"]);
    h.mock.faults().set_unavailable_per_mille(0);
    let reply = call(
        addr,
        "GET",
        &format!("{letters}?limit=-1"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(error_of(&reply), (400, "limit".to_string()));
    let reply = call(addr, "GET", letters, Some(SHOP_KEY), None).await;
    assert_eq!(error_of(&reply).0, 403, "a send key has no admin scope");
    let reply = call(addr, "GET", letters, None, None).await;
    assert_eq!(error_of(&reply).0, 401);
    let replay = format!("{letters}/replay");
    let reply = call(
        addr,
        "POST",
        &replay,
        Some(ADMIN),
        Some(json!({"message_ids": [1]})),
    )
    .await;
    assert_eq!(error_of(&reply), (400, "message_ids[0]".to_string()));
    let replayed = ok_json(
        &call(
            addr,
            "POST",
            &replay,
            Some(ADMIN),
            Some(json!({"message_ids": ["m-0"]})),
        )
        .await,
        "ReplayDeadLettersResponse",
    );
    assert_eq!(replayed["replayed"], "1");
    for _ in 0..200 {
        if h.mock
            .accepted()
            .iter()
            .any(|a| a.device_token == harness::token(0))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        h.mock
            .accepted()
            .iter()
            .any(|a| a.device_token == harness::token(0)),
        "replayed and delivered"
    );
    // The other one, purged.
    let purge = format!("{letters}/purge");
    let purged = ok_json(
        &call(
            addr,
            "POST",
            &purge,
            Some(ADMIN),
            Some(json!({"message_ids": ["m-1"]})),
        )
        .await,
        "PurgeDeadLettersResponse",
    );
    assert_eq!(purged["purged"], "1", "{purged}");
    let reply = call(
        addr,
        "POST",
        &purge,
        Some(ADMIN),
        Some(json!({"app_id": "news"})),
    )
    .await;
    assert_eq!(error_of(&reply), (400, "app_id".to_string()));
    let reply = call(
        addr,
        "POST",
        "/v1/apps/news/dead-letters/purge",
        Some(ADMIN),
        Some(json!({})),
    )
    .await;
    assert_eq!(error_of(&reply), (403, "app_id".to_string()));
    h.gateway.shutdown().await.unwrap();
}

/// A GET over HTTPS on a fresh connection, trusting `ca`, with a client certificate when given:
/// the status, or why the handshake or the request failed.
async fn https_get(
    addr: SocketAddr,
    path: &str,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<u16, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .uri(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {SHOP_KEY}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    Ok(response.status().as_u16())
}

/// A plaintext HTTP/1.1 GET: the status, or why it failed.
async fn plain_get(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    Ok(response.status().as_u16())
}

/// With `[tls]` the HTTP listener speaks HTTPS with the gRPC listener's certificate files: a
/// client trusting the server's CA is served (a batch delivered), plaintext HTTP is refused, a
/// reload puts new certificate files in effect for new connections on the HTTP door too, and
/// with `client_ca_file` a client without a certificate (or with one from another CA) is
/// refused while one with a certificate from that CA is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_uses_the_grpc_listeners_tls_and_mutual_tls() {
    use crate::harness::tls::TestCa;
    let h = harness::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let server_ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    let rogue_ca = TestCa::new("rogue CA");
    let (cert, key) = server_ca.leaf("pushgate");
    let cert_file = write("tls.crt", &cert);
    let key_file = write("tls.key", &key);
    let client_ca_file = write("client-ca.crt", &client_ca.pem);
    let file = dir.path().join("pushgate.toml");
    let config = |mutual: bool| {
        let client_ca = if mutual {
            format!("client_ca_file = \"{}\"\n", client_ca_file.display())
        } else {
            String::new()
        };
        format!(
            "listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{client_ca}[apps.shop]\napi_keys = [\"{SHOP_KEY}\"]\n[apps.shop.apns]\nkey_file = \"{}\"\nkey_id = \"{}\"\nteam_id = \"{}\"\ntopic = \"{}\"\nendpoint = \"{}\"\n",
            cert_file.display(),
            key_file.display(),
            h.dir.path().join("AuthKey.p8").display(),
            h.key.key_id,
            h.key.team_id,
            harness::TOPIC,
            h.mock.url()
        )
    };

    std::fs::write(&file, config(false)).unwrap();
    let running = pushgate::app::start(pushgate::config::Config::load(Some(&file)).unwrap())
        .await
        .unwrap();
    let addr = running.http_addr.unwrap();
    assert_eq!(
        https_get(addr, "/healthz", &server_ca.pem, None).await,
        Ok(200)
    );
    assert!(
        plain_get(addr, "/healthz").await.is_err(),
        "plaintext HTTP is refused"
    );
    assert!(
        https_get(addr, "/healthz", &rogue_ca.pem, None)
            .await
            .is_err(),
        "a server certificate from another CA is not trusted"
    );
    // Receipts over HTTPS: a bounded NDJSON stream answers 200 with the key.
    assert_eq!(
        https_get(
            addr,
            "/v1/apps/shop/receipts?wait_seconds=1",
            &server_ca.pem,
            None
        )
        .await,
        Ok(200)
    );
    let new_ca = TestCa::new("new server CA");
    let (cert, key) = new_ca.leaf("pushgate");
    write("tls.crt", &cert);
    write("tls.key", &key);
    pushgate::app::reload(&running.reloadable(), Some(&file)).unwrap();
    assert_eq!(
        https_get(addr, "/healthz", &new_ca.pem, None).await,
        Ok(200)
    );
    assert!(
        https_get(addr, "/healthz", &server_ca.pem, None)
            .await
            .is_err(),
        "after the reload the old certificate is no longer served"
    );
    running.shutdown().await.unwrap();

    let (cert, key) = server_ca.leaf("pushgate");
    write("tls.crt", &cert);
    write("tls.key", &key);
    std::fs::write(&file, config(true)).unwrap();
    let running = pushgate::app::start(pushgate::config::Config::load(Some(&file)).unwrap())
        .await
        .unwrap();
    let addr = running.http_addr.unwrap();
    let client = client_ca.leaf("a client");
    assert_eq!(
        https_get(addr, "/healthz", &server_ca.pem, Some(&client)).await,
        Ok(200)
    );
    assert!(
        https_get(addr, "/healthz", &server_ca.pem, None)
            .await
            .is_err(),
        "no client certificate"
    );
    let rogue = rogue_ca.leaf("a rogue client");
    assert!(
        https_get(addr, "/healthz", &server_ca.pem, Some(&rogue))
            .await
            .is_err(),
        "a client certificate from another CA"
    );
    assert!(plain_get(addr, "/healthz").await.is_err(), "plaintext");
    assert_eq!(
        https_get(addr, "/healthz", &server_ca.pem, Some(&client)).await,
        Ok(200),
        "still serving the right client after the refusals"
    );
    running.shutdown().await.unwrap();
    h.gateway.shutdown().await.unwrap();
}

/// `pushgate_http_requests_total` counts answers by route template, never by raw path (two
/// apps, one series), method and status; a path no route matches is `unmatched`; the duration
/// histogram has the same routes.
#[tokio::test]
async fn http_requests_are_counted_by_route_template() {
    let h = start(None).await;
    let addr = h.gateway.http_addr.unwrap();
    for (app, key) in [("shop", SHOP_KEY), ("news", NEWS_KEY)] {
        let reply = call(
            addr,
            "POST",
            &format!("/v1/apps/{app}/batches"),
            Some(key),
            Some(batch_json(0..1)),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    call(
        addr,
        "POST",
        "/v1/apps/shop/batches",
        None,
        Some(batch_json(0..1)),
    )
    .await;
    call(addr, "GET", "/v1/nothing/here", None, None).await;
    let text = h.gateway.gateway.metrics().encode();
    for line in [
        r#"pushgate_http_requests_total{route="/v1/apps/{app_id}/batches",method="POST",status="200"} 2"#,
        r#"pushgate_http_requests_total{route="/v1/apps/{app_id}/batches",method="POST",status="401"} 1"#,
        r#"pushgate_http_requests_total{route="unmatched",method="GET",status="404"} 1"#,
        r#"pushgate_http_request_seconds_count{route="/v1/apps/{app_id}/batches",method="POST"} 3"#,
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    assert!(
        !text.contains("/v1/apps/shop"),
        "a raw path became a label:\n{text}"
    );
    h.gateway.shutdown().await.unwrap();
}
