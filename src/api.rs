//! The gRPC edge: `pushgate.v1.PushGateway` over tonic. Translates protobuf to domain types and
//! back, maps errors to `tonic::Status` with field violations, and holds no business logic.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{
    BroadcastStream, UnboundedReceiverStream, errors::BroadcastStreamRecvError,
};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::debug;

use crate::auth::Caller;
use crate::gateway::{Batch, BatchResult, Gateway, SubmitError};
use crate::model::{self, FieldError, Platform, Priority, PushType, ReceiptStatus, epoch_millis};
use crate::proto;
use crate::receipts::ReceiptEnvelope;

type ReceiptStream = Pin<Box<dyn Stream<Item = Result<proto::Receipt, Status>> + Send>>;

/// The `PushGateway` service.
pub struct Api {
    gateway: Arc<Gateway>,
}

impl Api {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }

    /// The tonic server for this service, with generous message limits for large batches.
    pub fn into_server(self) -> proto::push_gateway_server::PushGatewayServer<Self> {
        proto::push_gateway_server::PushGatewayServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

#[tonic::async_trait]
impl proto::push_gateway_server::PushGateway for Api {
    async fn send_batch(
        &self,
        request: Request<proto::SendBatchRequest>,
    ) -> Result<Response<proto::SendBatchResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        if !caller.may_use(&request.app_id) {
            return Err(forbidden(&request.app_id));
        }
        let wait = request.wait_for_receipts;
        let mut batch = into_batch(request).map_err(invalid_argument)?;
        let (sink, mut receipts) = mpsc::unbounded_channel::<ReceiptEnvelope>();
        let mut collected = Vec::new();
        let result = {
            let submit = self
                .gateway
                .submit(&mut batch, wait.then_some(&sink), false);
            tokio::pin!(submit);
            // Collect receipts while submitting: receipts hold window slots, so a batch larger
            // than the window would otherwise wait on itself.
            loop {
                tokio::select! {
                    result = &mut submit => break result,
                    Some(envelope) = receipts.recv() => {
                        if envelope.receipt.terminal() {
                            collected.push(to_proto_receipt(&envelope.receipt));
                        }
                    }
                }
            }
        };
        drop(sink);
        let result = result.map_err(submit_status)?;
        if wait {
            while let Some(envelope) = receipts.recv().await {
                if envelope.receipt.terminal() {
                    collected.push(to_proto_receipt(&envelope.receipt));
                }
            }
        }
        Ok(Response::new(to_proto_response(result, collected)))
    }

    type StreamSendStream = ReceiptStream;

    async fn stream_send(
        &self,
        request: Request<Streaming<proto::SendBatchRequest>>,
    ) -> Result<Response<Self::StreamSendStream>, Status> {
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let (sink, receipts) = mpsc::unbounded_channel::<ReceiptEnvelope>();
        let gateway = Arc::clone(&self.gateway);
        tokio::spawn(async move {
            let stopping = gateway.stopping();
            loop {
                // Not reading while `submit` waits for window room is the backpressure: HTTP/2
                // flow control then slows the caller.
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = stopping.cancelled() => break,
                };
                let request = match next {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        debug!(%status, "StreamSend inbound ended with an error");
                        break;
                    }
                };
                let skeleton = BatchSkeleton::of(&request);
                if !caller.may_use(&request.app_id) {
                    let error = FieldError::new("app_id", forbidden(&request.app_id).message());
                    for receipt in skeleton.reject_all(&[error]) {
                        let _ = sink.send(receipt);
                    }
                    continue;
                }
                let outcome = match into_batch(request) {
                    Ok(mut batch) => gateway
                        .submit(&mut batch, Some(&sink), true)
                        .await
                        .map(drop)
                        .map_err(|e| match e {
                            SubmitError::Invalid(f) => vec![f],
                            SubmitError::Unavailable(reason) => vec![FieldError::new("", reason)],
                        }),
                    Err(errors) => Err(errors),
                };
                if let Err(errors) = outcome {
                    for receipt in skeleton.reject_all(&errors) {
                        let _ = sink.send(receipt);
                    }
                }
            }
        });
        let stream = UnboundedReceiverStream::new(receipts)
            // The envelope, and with it the window slot, is released as the receipt leaves.
            .map(|envelope| Ok(to_proto_receipt(&envelope.receipt)));
        Ok(Response::new(Box::pin(stream)))
    }

    type SubscribeReceiptsStream = ReceiptStream;

    async fn subscribe_receipts(
        &self,
        request: Request<proto::SubscribeReceiptsRequest>,
    ) -> Result<Response<Self::SubscribeReceiptsStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        if !caller.may_use(&request.app_id) {
            return Err(forbidden(&request.app_id));
        }
        if self.gateway.apps().get(&request.app_id).is_none() {
            return Err(invalid_argument(vec![FieldError::new(
                "app_id",
                format!("unknown app `{}`", request.app_id),
            )]));
        }
        if !request.resume_after.is_empty() {
            let Some(durable) = self.gateway.durable() else {
                return Err(Status::failed_precondition(
                    "resume_after needs durable delivery (redis.url); this gateway has none",
                ));
            };
            if !crate::durable::receipts::valid_cursor(&request.resume_after) {
                return Err(invalid_argument(vec![FieldError::new(
                    "resume_after",
                    "must be `0`, `$` or a receipt's cursor",
                )]));
            }
            let filter = crate::durable::receipts::Filter {
                campaign_id: request.campaign_id,
                include_non_terminal: request.include_non_terminal,
            };
            let stream = crate::durable::receipts::subscribe(
                Arc::clone(durable.store()),
                &request.app_id,
                request.resume_after,
                filter,
            );
            return Ok(Response::new(Box::pin(stream)));
        }
        let campaign = request.campaign_id;
        let include_non_terminal = request.include_non_terminal;
        let stream = BroadcastStream::new(self.gateway.hub().subscribe(&request.app_id))
            .filter_map(move |item| {
                let out = match item {
                    Ok(receipt) => {
                        let wanted = (include_non_terminal || receipt.terminal())
                            && (campaign.is_empty() || *receipt.meta.campaign_id == *campaign);
                        wanted.then(|| Ok(to_proto_receipt(&receipt)))
                    }
                    Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Err(Status::data_loss(
                        format!("subscriber fell behind and missed {missed} receipts"),
                    ))),
                };
                std::future::ready(out)
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// What is needed to reject every recipient of a batch that could not be accepted at all.
struct BatchSkeleton {
    app_id: String,
    batch_id: String,
    campaign_id: String,
    recipients: Vec<(String, i32, String)>,
}

impl BatchSkeleton {
    fn of(request: &proto::SendBatchRequest) -> Self {
        Self {
            app_id: request.app_id.clone(),
            batch_id: request.batch_id.clone(),
            campaign_id: request.campaign_id.clone(),
            recipients: request
                .recipients
                .iter()
                .map(|r| (r.message_id.clone(), r.platform, r.user_id.clone()))
                .collect(),
        }
    }

    fn reject_all(self, errors: &[FieldError]) -> Vec<ReceiptEnvelope> {
        let field = errors.first().map(|e| e.field.clone()).unwrap_or_default();
        let reason = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let now = std::time::SystemTime::now();
        self.recipients
            .into_iter()
            .map(|(message_id, platform, user_id)| {
                let meta = Arc::new(model::MessageMeta {
                    app_id: self.app_id.as_str().into(),
                    batch_id: self.batch_id.as_str().into(),
                    campaign_id: self.campaign_id.as_str().into(),
                    message_id,
                    platform: platform_from_proto(platform).unwrap_or(Platform::Apns),
                    user_id,
                    priority: Priority::Default,
                    accepted_at: now,
                    expires_at: None,
                    campaign_rate_per_minute: 0,
                });
                ReceiptEnvelope {
                    receipt: Arc::new(model::Receipt {
                        meta,
                        status: ReceiptStatus::Rejected,
                        reason: reason.clone(),
                        field: field.clone(),
                        provider_status: 0,
                        provider_message_id: String::new(),
                        attempt: 0,
                        completed_at: Some(now),
                        next_attempt_at: None,
                        token_invalid_since: None,
                    }),
                    permit: None,
                }
            })
            .collect()
    }
}

fn forbidden(app_id: &str) -> Status {
    Status::permission_denied(format!("this API key may not use app `{app_id}`"))
}

fn invalid_argument(errors: Vec<FieldError>) -> Status {
    let message = errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    let mut details = ErrorDetails::new();
    for e in &errors {
        details.add_bad_request_violation(e.field.clone(), e.reason.clone());
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

fn submit_status(error: SubmitError) -> Status {
    match error {
        SubmitError::Invalid(e) => invalid_argument(vec![e]),
        SubmitError::Unavailable(reason) => Status::unavailable(reason),
    }
}

fn platform_from_proto(value: i32) -> Option<Platform> {
    match proto::Platform::try_from(value).ok()? {
        proto::Platform::Apns => Some(Platform::Apns),
        proto::Platform::Fcm => Some(Platform::Fcm),
        proto::Platform::Unspecified => None,
    }
}

fn platform_to_proto(platform: Platform) -> proto::Platform {
    match platform {
        Platform::Apns => proto::Platform::Apns,
        Platform::Fcm => proto::Platform::Fcm,
    }
}

/// Translates a request into a domain batch. Structural errors (an unknown platform or enum
/// value) reject the whole batch, listing every offending field.
pub fn into_batch(request: proto::SendBatchRequest) -> Result<Batch, Vec<FieldError>> {
    let mut errors = Vec::new();
    let template = request.template.unwrap_or_default();
    let priority = match proto::Priority::try_from(template.priority) {
        Ok(proto::Priority::Unspecified) => Priority::Default,
        Ok(proto::Priority::Normal) => Priority::Normal,
        Ok(proto::Priority::High) => Priority::High,
        Err(_) => {
            errors.push(FieldError::new(
                "template.priority",
                "unknown priority value",
            ));
            Priority::Default
        }
    };
    let push_type = match proto::PushType::try_from(template.push_type) {
        Ok(p) => push_type_from_proto(p),
        Err(_) => {
            errors.push(FieldError::new(
                "template.push_type",
                "unknown push type value",
            ));
            None
        }
    };
    let template = model::Template {
        title: template.title,
        subtitle: template.subtitle,
        body: template.body,
        image_url: template.image_url,
        deep_link: template.deep_link,
        sound: template.sound,
        badge: template.badge,
        category: template.category,
        thread_id: template.thread_id,
        data: template.data,
        collapse_key: template.collapse_key,
        ttl: (template.ttl_seconds > 0)
            .then(|| Duration::from_secs(u64::from(template.ttl_seconds))),
        priority,
        push_type,
        content_available: template.content_available,
        mutable_content: template.mutable_content,
        apns_json: template.apns_json,
        fcm_json: template.fcm_json,
        android_channel_id: template.android_channel_id,
    };
    let mut recipients = Vec::with_capacity(request.recipients.len());
    for (index, r) in request.recipients.into_iter().enumerate() {
        let Some(platform) = platform_from_proto(r.platform) else {
            errors.push(FieldError::new(
                format!("recipients[{index}].platform"),
                "must be APNS or FCM",
            ));
            continue;
        };
        recipients.push(model::Recipient {
            message_id: r.message_id,
            platform,
            device_token: r.device_token,
            vars: r.vars,
            user_id: r.user_id,
            locale: r.locale,
            timezone: r.timezone,
            apns_json: r.apns_json,
            fcm_json: r.fcm_json,
            title: r.title,
            body: r.body,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Batch {
        app_id: request.app_id,
        batch_id: request.batch_id,
        campaign_id: request.campaign_id,
        template,
        recipients,
        campaign_rate_per_minute: request.campaign_rate_per_minute,
    })
}

fn push_type_from_proto(p: proto::PushType) -> Option<PushType> {
    Some(match p {
        proto::PushType::Unspecified => return None,
        proto::PushType::Alert => PushType::Alert,
        proto::PushType::Background => PushType::Background,
        proto::PushType::Voip => PushType::Voip,
        proto::PushType::Complication => PushType::Complication,
        proto::PushType::Fileprovider => PushType::FileProvider,
        proto::PushType::Mdm => PushType::Mdm,
        proto::PushType::Liveactivity => PushType::LiveActivity,
        proto::PushType::Location => PushType::Location,
        proto::PushType::Pushtotalk => PushType::PushToTalk,
        proto::PushType::Widgets => PushType::Widgets,
        proto::PushType::Controls => PushType::Controls,
    })
}

fn status_to_proto(status: ReceiptStatus) -> proto::ReceiptStatus {
    match status {
        ReceiptStatus::Delivered => proto::ReceiptStatus::Delivered,
        ReceiptStatus::InvalidToken => proto::ReceiptStatus::InvalidToken,
        ReceiptStatus::Rejected => proto::ReceiptStatus::Rejected,
        ReceiptStatus::Failed => proto::ReceiptStatus::Failed,
        ReceiptStatus::Expired => proto::ReceiptStatus::Expired,
        ReceiptStatus::Dropped => proto::ReceiptStatus::Dropped,
        ReceiptStatus::Retrying => proto::ReceiptStatus::Retrying,
    }
}

/// Translates a domain receipt for the wire.
pub fn to_proto_receipt(r: &model::Receipt) -> proto::Receipt {
    proto::Receipt {
        app_id: r.meta.app_id.to_string(),
        batch_id: r.meta.batch_id.to_string(),
        campaign_id: r.meta.campaign_id.to_string(),
        message_id: r.meta.message_id.clone(),
        platform: platform_to_proto(r.meta.platform) as i32,
        status: status_to_proto(r.status) as i32,
        terminal: r.terminal(),
        reason: r.reason.clone(),
        provider_status: u32::from(r.provider_status),
        provider_message_id: r.provider_message_id.clone(),
        attempt: r.attempt,
        accepted_at_ms: epoch_millis(r.meta.accepted_at),
        completed_at_ms: r.completed_at.map(epoch_millis).unwrap_or(0),
        next_attempt_at_ms: r.next_attempt_at.map(epoch_millis).unwrap_or(0),
        token_invalid_since_ms: r.token_invalid_since.map(epoch_millis).unwrap_or(0),
        user_id: r.meta.user_id.clone(),
        field: r.field.clone(),
        cursor: String::new(),
    }
}

fn to_proto_response(
    result: BatchResult,
    receipts: Vec<proto::Receipt>,
) -> proto::SendBatchResponse {
    let accepted = u32::try_from(result.accepted()).unwrap_or(u32::MAX);
    let rejected = u32::try_from(result.rejected()).unwrap_or(u32::MAX);
    proto::SendBatchResponse {
        batch_id: result.batch_id,
        accepted,
        rejected,
        results: result
            .results
            .into_iter()
            .map(|r| proto::RecipientResult {
                message_id: r.message_id,
                accepted: r.accepted,
                field: r.field,
                reason: r.reason,
                index: i32::try_from(r.index).unwrap_or(i32::MAX),
            })
            .collect(),
        receipts,
    }
}
