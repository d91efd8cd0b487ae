//! The OpenTelemetry exporter: a `pushgate serve` with `[otlp]` sends its spans over OTLP/gRPC
//! to a local collector stand-in (a tonic `TraceService` from `opentelemetry-proto`), with the
//! configured `service.name` and the per-message `deliver` span's fields.

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use parking_lot::Mutex;

use crate::google_credentials::{account, assert_delivered, connect, mock_fcm, send, spawn_with};

/// One exported span: the resource's `service.name`, the span name, its string attributes.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    attributes: Vec<(String, String)>,
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Exported>>>,
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Exported {
                        service: service.clone(),
                        name: span.name.clone(),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_grpc() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let fcm = mock_fcm().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("sa.json");
    let mut key: serde_json::Value = serde_json::from_str(&account().json).unwrap();
    key["token_uri"] = serde_json::Value::from(fcm.token_uri());
    std::fs::write(&key_file, key.to_string()).unwrap();
    let (gateway, addr) = spawn_with(
        dir.path(),
        &format!(
            "[otlp]\nendpoint = \"http://{collector_addr}\"\nservice_name = \"pushgate-it\"\n"
        ),
        &format!(
            "credentials_file = \"{}\"\nendpoint = \"{}\"",
            key_file.display(),
            fcm.url()
        ),
        // Export batches every 100 ms instead of every 5 s.
        &[("OTEL_BSP_SCHEDULE_DELAY", "100".into())],
    );
    let mut client = connect(&gateway, &addr).await;
    let receipts = send(&mut client, 0..5).await;
    assert_delivered(&receipts, 5, &gateway);
    let deadline = Instant::now() + Duration::from_secs(20);
    let delivers = loop {
        let delivers: Vec<Exported> = collector
            .spans
            .lock()
            .iter()
            .filter(|s| s.name == "deliver")
            .cloned()
            .collect();
        if delivers.len() >= 5 {
            break delivers;
        }
        assert!(
            Instant::now() < deadline,
            "spans seen: {:?}\n{}",
            collector.spans.lock(),
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for span in &delivers {
        assert_eq!(span.service, "pushgate-it");
        let attribute = |k: &str| {
            span.attributes
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(attribute("app"), Some("shop"), "{span:?}");
        assert_eq!(attribute("provider"), Some("fcm"), "{span:?}");
        assert!(
            attribute("message_id").is_some_and(|m| m.starts_with("m-")),
            "{span:?}"
        );
    }
}
