//! Protobuf requests into domain batches, and ingest results back into responses: the gRPC
//! edge's translation, with structural errors named by field.

use std::time::Duration;

use crate::domain::{self, Batch, BatchOutline, FieldError, Priority, PushType};
use crate::ingest::BatchResult;
use crate::proto;
use crate::wire::platform_from_proto;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

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
    let locales = localized(template.locales);
    let experiment = template.experiment.map(|e| {
        let share = e.holdout_share;
        let holdout_bp = if share.is_finite() && (0.0..1.0).contains(&share) {
            (share * 10_000.0).round() as u32
        } else {
            errors.push(FieldError::new(
                "template.experiment.holdout_share",
                "must be at least 0 and below 1",
            ));
            0
        };
        domain::Experiment {
            variants: e
                .variants
                .into_iter()
                .map(|v| domain::Variant {
                    name: v.name,
                    weight: v.weight,
                    texts: domain::LocalizedText {
                        title: v.title,
                        subtitle: v.subtitle,
                        body: v.body,
                    },
                    locales: localized(v.locales),
                })
                .collect(),
            holdout_bp,
        }
    });
    let template = domain::Template {
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
        locales,
        experiment,
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
        recipients.push(domain::Recipient {
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
            token_registered_at_ms: r.token_registered_at_ms,
            send_at_ms: r.send_at_ms,
        });
    }
    let optimal_send_time = match proto::SendTime::try_from(request.send_time) {
        Ok(proto::SendTime::Unspecified) => false,
        Ok(proto::SendTime::Optimal) => true,
        Err(_) => {
            errors.push(FieldError::new("send_time", "unknown send time value"));
            false
        }
    };
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
        bypass_policies: request.bypass_policies,
        send_at_ms: request.send_at_ms,
        local_send_time: request.local_send_time,
        late_sends_now: request.late_sends_now,
        optimal_send_time,
    })
}

fn localized(
    map: std::collections::BTreeMap<String, proto::LocalizedText>,
) -> std::collections::BTreeMap<String, domain::LocalizedText> {
    map.into_iter()
        .map(|(k, t)| {
            (
                k,
                domain::LocalizedText {
                    title: t.title,
                    subtitle: t.subtitle,
                    body: t.body,
                },
            )
        })
        .collect()
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

/// The response to a SendBatch.
pub fn to_proto_response(
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
                maybe_accepted: r.maybe_accepted,
            })
            .collect(),
        receipts,
    }
}

/// What is needed to refuse every recipient of a request read as a whole.
pub fn outline_of(request: &proto::SendBatchRequest) -> BatchOutline {
    BatchOutline {
        app_id: request.app_id.clone(),
        batch_id: request.batch_id.clone(),
        campaign_id: request.campaign_id.clone(),
        recipients: request
            .recipients
            .iter()
            .map(|r| {
                (
                    r.message_id.clone(),
                    platform_from_proto(r.platform),
                    r.user_id.clone(),
                )
            })
            .collect(),
    }
}

/// INVALID_ARGUMENT naming each field, with the fields also as BadRequest details.
pub(super) fn invalid_argument(errors: Vec<FieldError>) -> Status {
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
