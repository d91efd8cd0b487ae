//! The OpenAPI 3 document of the HTTP/JSON API (`GET /openapi.json`, kept in the repository as
//! `docs/openapi.json`). The schemas of the protobuf messages are derived from the compiled
//! `pushgate.v1` descriptors, field by field in the JSON form pbjson reads and writes (proto
//! field names, enums as their names, 64-bit integers as decimal strings), so the document
//! cannot drift from the messages; the paths and the error shape are written here.

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value, json};

use crate::proto;

/// The protobuf package whose messages the HTTP API carries.
const PACKAGE: &str = "pushgate.v1";
/// The messages the HTTP API reads or writes; what they refer to is included too.
const ROOTS: &[&str] = &[
    "SendBatchRequest",
    "SendBatchResponse",
    "Receipt",
    "InvalidToken",
    "OptOutResponse",
    "ForgetUserResponse",
    "CancelScheduledRequest",
    "CancelScheduledResponse",
    "TrackEventsRequest",
    "TrackEventsResponse",
    "CampaignStats",
    "ListDeadLettersResponse",
    "ReplayDeadLettersRequest",
    "ReplayDeadLettersResponse",
    "PurgeDeadLettersRequest",
    "PurgeDeadLettersResponse",
];
/// Messages only ever written by the gateway: every field is emitted (pbjson `emit_fields`), so
/// their schemas require every field but the `optional` ones.
const WRITTEN_ONLY: &[&str] = &[
    "SendBatchResponse",
    "RecipientResult",
    "Receipt",
    "InvalidToken",
    "OptOutResponse",
    "ForgetUserResponse",
    "CancelScheduledResponse",
    "TrackEventsResponse",
    "TrackEventResult",
    "CampaignStats",
    "VariantStats",
    "ProviderStats",
    "StatusCount",
    "ListDeadLettersResponse",
    "DeadLetter",
    "ReplayDeadLettersResponse",
    "PurgeDeadLettersResponse",
];

/// The document, pretty-printed, with a final newline (the form kept in the repository).
pub fn document_json() -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(&document()).unwrap_or_default();
    out.push(b'\n');
    out
}

/// The document.
pub fn document() -> Value {
    let mut doc = base_document();
    if let (Some(paths), Value::Object(more)) = (doc["paths"].as_object_mut(), service_paths()) {
        paths.extend(more);
    }
    doc
}

/// An error response of each code, for a `responses` object.
fn errors(codes: &[&str]) -> Value {
    let mut out = Map::new();
    for code in codes {
        out.insert(
            (*code).into(),
            json!({
                "description": error_description(code),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
            }),
        );
    }
    Value::Object(out)
}

/// `responses`: 200 with `schema` and the errors of `codes`.
fn answers(description: &str, schema: &str, codes: &[&str]) -> Value {
    let mut out = errors(codes);
    out["200"] = json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    });
    out
}

fn path_parameter(name: &str, description: &str) -> Value {
    json!({
        "name": name, "in": "path", "required": true, "description": description,
        "schema": {"type": "string", "minLength": 1, "maxLength": 256}
    })
}

fn json_body(schema: &str, example: Value) -> Value {
    json!({
        "required": true,
        "content": {"application/json": {
            "schema": {"$ref": format!("#/components/schemas/{schema}")},
            "example": example
        }}
    })
}

/// The routes of PushGatewayPolicy, PushGatewayInsights and PushGatewayAdmin.
fn service_paths() -> Value {
    let app_id = path_parameter("app_id", "The app, as configured under `[apps.<id>]`.");
    let user_id = path_parameter(
        "user_id",
        "The app's user id (as sent in `Recipient.user_id`).",
    );
    let campaign_id = path_parameter(
        "campaign_id",
        "The campaign (`SendBatchRequest.campaign_id`).",
    );
    // Policy and insights: the send scope (an app's api_keys or admin_keys), like SendBatch.
    let policy_errors: &[&str] = &["400", "401", "403", "404", "501", "503"];
    let body_errors: &[&str] = &["400", "401", "403", "404", "413", "415", "501", "503"];
    json!({
        "/v1/apps/{app_id}/invalid-tokens": {
            "get": {
                "operationId": "ListInvalidTokens",
                "summary": "Device tokens reported dead, one page (gRPC PushGatewayPolicy.ListInvalidTokens).",
                "parameters": [
                    app_id.clone(),
                    {"name": "since_ms", "in": "query", "schema": {"type": "integer", "format": "int64"},
                     "description": "Only tokens reported at or after this instant (epoch ms); 0 = all kept."},
                    {"name": "after", "in": "query", "schema": {"type": "string"},
                     "description": "Resume after this cursor (a token's `cursor`, or the previous page's `next_after`)."},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
                     "description": "At most this many tokens (default 1000, at most 10000)."}
                ],
                "responses": answers(
                    "The tokens in the order the gateway learned of them; `next_after` is the last one's cursor (a page shorter than `limit` is the last).",
                    "InvalidTokensPage", policy_errors)
            }
        },
        "/v1/apps/{app_id}/users/{user_id}/opt-out": {
            "post": {
                "operationId": "SetOptOut",
                "summary": "The user's messages end DROPPED `opted_out` until cleared (gRPC SetOptOut).",
                "parameters": [app_id.clone(), user_id.clone()],
                "responses": answers("`changed`: whether the call changed the user's state.", "OptOutResponse", policy_errors)
            },
            "delete": {
                "operationId": "ClearOptOut",
                "summary": "Clears the user's opt-out (gRPC ClearOptOut).",
                "parameters": [app_id.clone(), user_id.clone()],
                "responses": answers("`changed`: whether the call changed the user's state.", "OptOutResponse", policy_errors)
            }
        },
        "/v1/apps/{app_id}/users/{user_id}": {
            "delete": {
                "operationId": "ForgetUser",
                "summary": "Erases what the gateway keeps about the user (gRPC ForgetUser).",
                "parameters": [app_id.clone(), user_id],
                "responses": answers("What was erased.", "ForgetUserResponse", policy_errors)
            }
        },
        "/v1/apps/{app_id}/scheduled/cancel": {
            "post": {
                "operationId": "CancelScheduled",
                "summary": "Ends scheduled messages not sent yet, DROPPED `cancelled` (gRPC CancelScheduled). Exactly one of campaign_id, batch_id, message_ids.",
                "parameters": [app_id.clone()],
                "requestBody": json_body("CancelScheduledRequest", json!({"campaign_id": "spring-sale"})),
                "responses": answers("Messages cancelled.", "CancelScheduledResponse", body_errors)
            }
        },
        "/v1/apps/{app_id}/events": {
            "post": {
                "operationId": "TrackEvents",
                "summary": "Records opens and conversions, idempotent per `event_id` (gRPC PushGatewayInsights.TrackEvents).",
                "parameters": [app_id.clone()],
                "requestBody": json_body("TrackEventsRequest", json!({"events": [
                    {"event_id": "open-1", "type": "OPEN", "message_id": "m-1"},
                    {"event_id": "buy-1", "type": "CONVERSION", "user_id": "u-2", "campaign_id": "spring-sale"}
                ]})),
                "responses": answers("One result per event.", "TrackEventsResponse", body_errors)
            }
        },
        "/v1/apps/{app_id}/campaigns/{campaign_id}/stats": {
            "get": {
                "operationId": "GetCampaignStats",
                "summary": "Per variant and provider: receipts, opens, conversions, rates and lift against the control (gRPC GetCampaignStats).",
                "parameters": [
                    app_id.clone(), campaign_id,
                    {"name": "control", "in": "query", "schema": {"type": "string"},
                     "description": "The variant to compare the others against when the campaign has no holdout."}
                ],
                "responses": answers("The campaign's statistics.", "CampaignStats", policy_errors)
            }
        },
        "/v1/apps/{app_id}/dead-letters": {
            "get": {
                "operationId": "ListDeadLetters",
                "summary": "Dead letters of the app (gRPC PushGatewayAdmin.ListDeadLetters; admin keys; durable delivery only, else 501).",
                "parameters": [
                    app_id.clone(),
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": u32::MAX}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": u32::MAX},
                     "description": "At most this many (default 100, at most 1000)."}
                ],
                "responses": answers("A page of dead letters and the total.", "ListDeadLettersResponse", policy_errors)
            }
        },
        "/v1/apps/{app_id}/dead-letters/replay": {
            "post": {
                "operationId": "ReplayDeadLetters",
                "summary": "Attempts the given dead letters again (all, up to `limit`, when none given), from attempt 1 (admin keys; durable delivery only).",
                "parameters": [app_id.clone()],
                "requestBody": json_body("ReplayDeadLettersRequest", json!({"message_ids": ["m-1"]})),
                "responses": answers("Dead letters replayed.", "ReplayDeadLettersResponse", body_errors)
            }
        },
        "/v1/apps/{app_id}/dead-letters/purge": {
            "post": {
                "operationId": "PurgeDeadLetters",
                "summary": "Deletes the given dead letters (all when none given; admin keys; durable delivery only).",
                "parameters": [app_id],
                "requestBody": json_body("PurgeDeadLettersRequest", json!({"message_ids": ["m-1"]})),
                "responses": answers("Dead letters deleted.", "PurgeDeadLettersResponse", body_errors)
            }
        }
    })
}

/// The document without the services' routes.
fn base_document() -> Value {
    let mut schemas = Map::new();
    if let Ok(set) = FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET) {
        add_message_schemas(&set, &mut schemas);
    }
    schemas.insert("Error".into(), error_schema());
    schemas.insert(
        "InvalidTokensPage".into(),
        json!({
            "type": "object",
            "properties": {
                "invalid_tokens": {"type": "array", "items": {"$ref": "#/components/schemas/InvalidToken"}},
                "next_after": {"type": "string", "description": "The last token's cursor, empty when the page is empty: pass it as `after` for the next page."}
            },
            "required": ["invalid_tokens", "next_after"],
            "additionalProperties": false
        }),
    );
    schemas.insert(
        "Health".into(),
        json!({
            "type": "object",
            "properties": {"status": {"type": "string", "enum": ["SERVING", "NOT_SERVING"]}},
            "required": ["status"],
            "additionalProperties": false
        }),
    );
    let app_id = json!({
        "name": "app_id", "in": "path", "required": true,
        "description": "The app, as configured under `[apps.<id>]`.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 256}
    });
    let mut send_responses = errors(&["400", "401", "403", "404", "413", "415", "429", "503"]);
    send_responses["200"] = json!({
        "description": "Every recipient accepted or rejected (with the field and the reason); with `wait_for_receipts`, the terminal receipt of each accepted one.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SendBatchResponse"}}}
    });
    let mut receipt_responses = errors(&["400", "401", "403", "404", "503"]);
    receipt_responses["200"] = json!({
        "description": "Receipts as they happen. `text/event-stream` (the default): one `receipt` event per receipt, `data` a `Receipt` in JSON and `id` its cursor when it has one; an `error` event (`data` an `Error`) ends the stream. `application/x-ndjson` (by `Accept`): one `Receipt` per line, or an `Error` line that ends the stream.",
        "content": {
            "text/event-stream": {"schema": {"type": "string"}},
            "application/x-ndjson": {"schema": {"type": "string"}}
        }
    });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "pushgate HTTP/JSON API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The `pushgate.v1.PushGateway` service over HTTP and JSON (the proto3 JSON mapping of the same messages: proto field names, lowerCamelCase names accepted on input too, enums by name, 64-bit integers as strings). Same API keys, authorization and errors as gRPC: a gRPC status becomes its HTTP status (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503) with an `Error` body naming the field."
        },
        "paths": {
            "/v1/apps/{app_id}/batches": {
                "post": {
                    "operationId": "SendBatch",
                    "summary": "Validate and accept a batch (gRPC SendBatch).",
                    "description": "`app_id` in the body may be left out; when given it must equal the path's.",
                    "parameters": [app_id.clone()],
                    "requestBody": {
                        "required": true,
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/SendBatchRequest"},
                            "example": {
                                "campaign_id": "abandoned-cart",
                                "wait_for_receipts": true,
                                "template": {"title": "{{ first_name | default: \"Hi\" }}, your cart misses you", "body": "{{ items }} items are waiting", "ttl_seconds": 7200},
                                "recipients": [
                                    {"platform": "APNS", "device_token": "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90", "vars": {"first_name": "Ann", "items": "3"}, "user_id": "u-1"},
                                    {"platform": "FCM", "device_token": "fcm-registration-token-0001", "vars": {"items": "1"}, "user_id": "u-2"}
                                ]
                            }
                        }}
                    },
                    "responses": send_responses
                }
            },
            "/v1/apps/{app_id}/receipts": {
                "get": {
                    "operationId": "SubscribeReceipts",
                    "summary": "The app's receipts, live (gRPC SubscribeReceipts).",
                    "parameters": [
                        app_id,
                        {"name": "campaign_id", "in": "query", "schema": {"type": "string"},
                         "description": "Only receipts of this campaign."},
                        {"name": "include_non_terminal", "in": "query", "schema": {"type": "boolean"},
                         "description": "Include non-terminal RETRYING receipts."},
                        {"name": "resume_after", "in": "query", "schema": {"type": "string"},
                         "description": "Durable delivery (Redis) only: replay the app's receipts stream after this cursor (`0` = the oldest kept, `$` = from now, else a receipt's `cursor`), then follow it live."},
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                         "description": "Sent by a reconnecting EventSource; takes the place of `resume_after`."},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                         "description": "End the response after this many receipts."},
                        {"name": "wait_seconds", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                         "description": "End the response after this many seconds."}
                    ],
                    "responses": receipt_responses
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "Health",
                    "summary": "Readiness: SERVING while the store is healthy and the gateway is not shutting down.",
                    "security": [],
                    "responses": {
                        "200": {"description": "Serving.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
                        "503": {"description": "Not serving (store unreachable, or shutting down).", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}
                    }
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "OpenApi",
                    "summary": "This document.",
                    "security": [],
                    "responses": {
                        "200": {"description": "The OpenAPI document.", "content": {"application/json": {"schema": {"type": "object"}}}}
                    }
                }
            }
        },
        "security": [{"bearerAuth": []}],
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http", "scheme": "bearer",
                    "description": "An API key of the app (`apps.<id>.api_keys` or `admin_keys`). Not needed when no key is configured at all (open mode)."
                }
            },
            "schemas": schemas
        }
    })
}

fn error_description(code: &str) -> &'static str {
    match code {
        "400" => {
            "INVALID_ARGUMENT (or FAILED_PRECONDITION, OUT_OF_RANGE): `field` names what is wrong."
        }
        "401" => "UNAUTHENTICATED: no key, or an unknown one.",
        "403" => {
            "PERMISSION_DENIED: the key may not use this app, or there is no such app (one answer for both)."
        }
        "404" => "NOT_FOUND: no such route.",
        "501" => {
            "UNIMPLEMENTED: this gateway does not serve the service (dead letters need durable delivery, `[redis]`)."
        }
        "413" => "The body is larger than `http_max_body_bytes`.",
        "415" => "The body is not `application/json`.",
        "429" => "RESOURCE_EXHAUSTED.",
        "503" => "UNAVAILABLE: shutting down, or the store (Redis) is unreachable.",
        _ => "Error.",
    }
}

fn error_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "integer", "description": "The HTTP status."},
                    "status": {"type": "string", "description": "The gRPC status name, e.g. `INVALID_ARGUMENT`."},
                    "message": {"type": "string"},
                    "field": {"type": "string", "description": "The first offending field (`recipients[3].device_token`), empty when the error is not about one."},
                    "field_violations": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"field": {"type": "string"}, "description": {"type": "string"}},
                            "required": ["field", "description"],
                            "additionalProperties": false
                        }
                    }
                },
                "required": ["code", "status", "message", "field", "field_violations"],
                "additionalProperties": false
            }
        },
        "required": ["error"],
        "additionalProperties": false
    })
}

/// Adds a schema for every root message and what it refers to (messages and enums).
fn add_message_schemas(set: &FileDescriptorSet, schemas: &mut Map<String, Value>) {
    let Some(file) = set.file.iter().find(|f| f.package() == PACKAGE) else {
        return;
    };
    let comment = |path: &[i32]| -> Option<String> {
        let info = file.source_code_info.as_ref()?;
        let location = info.location.iter().find(|l| l.path == path)?;
        let text = location.leading_comments().trim();
        (!text.is_empty()).then(|| text.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    let mut pending: Vec<String> = ROOTS.iter().map(|s| s.to_string()).collect();
    while let Some(name) = pending.pop() {
        if schemas.contains_key(&name) {
            continue;
        }
        if let Some((index, message)) = file
            .message_type
            .iter()
            .enumerate()
            .find(|(_, m)| m.name() == name)
        {
            let schema = message_schema(message, &mut pending, |field: usize| {
                comment(&[4, index as i32, 2, field as i32])
            });
            let mut schema = schema;
            if WRITTEN_ONLY.contains(&name.as_str()) {
                let required: Vec<&str> = message
                    .field
                    .iter()
                    .filter(|f| !f.proto3_optional())
                    .map(|f| f.name())
                    .collect();
                schema["required"] = json!(required);
            }
            if let Some(text) = comment(&[4, index as i32]) {
                schema["description"] = Value::from(text);
            }
            schemas.insert(name, schema);
        } else if let Some((index, e)) = file
            .enum_type
            .iter()
            .enumerate()
            .find(|(_, e)| e.name() == name)
        {
            let mut schema = json!({
                "type": "string",
                "enum": e.value.iter().map(|v| v.name().to_string()).collect::<Vec<_>>()
            });
            if let Some(text) = comment(&[5, index as i32]) {
                schema["description"] = Value::from(text);
            }
            schemas.insert(name, schema);
        }
    }
}

fn message_schema(
    message: &DescriptorProto,
    pending: &mut Vec<String>,
    comment: impl Fn(usize) -> Option<String>,
) -> Value {
    let mut properties = Map::new();
    for (index, field) in message.field.iter().enumerate() {
        let mut schema = field_schema(message, field, pending);
        if let Some(text) = comment(index) {
            if schema.get("$ref").is_some() {
                // OpenAPI 3.0 ignores siblings of `$ref`; `allOf` keeps the description.
                schema = json!({"allOf": [schema]});
            }
            schema["description"] = Value::from(text);
        }
        properties.insert(field.name().to_string(), schema);
    }
    json!({"type": "object", "properties": properties, "additionalProperties": false})
}

fn field_schema(
    message: &DescriptorProto,
    field: &FieldDescriptorProto,
    pending: &mut Vec<String>,
) -> Value {
    if field.r#type() == Type::Message {
        let type_name = short_name(field.type_name());
        if let Some(entry) = message
            .nested_type
            .iter()
            .find(|n| n.name() == type_name && n.options.as_ref().is_some_and(|o| o.map_entry()))
        {
            let value = entry
                .field
                .iter()
                .find(|f| f.number() == 2)
                .map(|f| scalar_schema(f, pending))
                .unwrap_or_else(|| json!({}));
            return json!({"type": "object", "additionalProperties": value});
        }
    }
    let item = scalar_schema(field, pending);
    if field.label() == Label::Repeated {
        json!({"type": "array", "items": item})
    } else {
        item
    }
}

/// The schema of one value of `field` (an element, for a repeated field).
fn scalar_schema(field: &FieldDescriptorProto, pending: &mut Vec<String>) -> Value {
    match field.r#type() {
        Type::String => json!({"type": "string"}),
        Type::Bytes => json!({"type": "string", "format": "byte"}),
        Type::Bool => json!({"type": "boolean"}),
        Type::Int32 | Type::Sint32 | Type::Sfixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        Type::Uint32 | Type::Fixed32 => {
            json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
        }
        // The proto3 JSON mapping writes 64-bit integers as decimal strings.
        Type::Int64 | Type::Sint64 | Type::Sfixed64 => {
            json!({"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"})
        }
        Type::Uint64 | Type::Fixed64 => {
            json!({"type": "string", "format": "uint64", "pattern": "^[0-9]+$"})
        }
        Type::Float | Type::Double => json!({"type": "number"}),
        Type::Enum | Type::Message | Type::Group => {
            let name = short_name(field.type_name()).to_string();
            pending.push(name.clone());
            json!({"$ref": format!("#/components/schemas/{name}")})
        }
    }
}

/// `.pushgate.v1.Template` -> `Template` (nested map entries keep only their own name).
fn short_name(type_name: &str) -> &str {
    type_name.rsplit('.').next().unwrap_or(type_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_of_the_carried_messages_is_described() {
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        for name in [
            "SendBatchRequest",
            "Template",
            "Recipient",
            "SendBatchResponse",
            "RecipientResult",
            "Receipt",
            "Platform",
            "ReceiptStatus",
            "Priority",
            "PushType",
        ] {
            assert!(schemas.get(name).is_some(), "{name} missing");
        }
        let recipient = &schemas["Recipient"]["properties"];
        assert_eq!(recipient["vars"]["type"], "object");
        assert_eq!(recipient["vars"]["additionalProperties"]["type"], "string");
        assert_eq!(
            schemas["Receipt"]["properties"]["accepted_at_ms"]["type"],
            "string"
        );
        assert!(
            schemas["Platform"]["enum"]
                .as_array()
                .is_some_and(|v| v.contains(&Value::from("APNS")))
        );
        let required = schemas["Receipt"]["required"].as_array().unwrap();
        assert!(required.contains(&Value::from("status")));
        assert!(
            schemas["Recipient"].get("required").is_none(),
            "requests require nothing"
        );
        // Only what the HTTP API carries: no request message of a route that reads its query.
        assert!(schemas.get("ListDeadLettersRequest").is_none());
        for name in [
            "DeadLetter",
            "CampaignStats",
            "InvalidTokensPage",
            "TrackEventsRequest",
        ] {
            assert!(schemas.get(name).is_some(), "{name} missing");
        }
        let paths = doc["paths"].as_object().unwrap();
        for route in crate::edge::http::ROUTES {
            assert!(
                paths.contains_key(*route),
                "{route} has no path in the document"
            );
        }
    }
}
