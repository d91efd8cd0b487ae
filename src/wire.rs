//! The wire form of a receipt: domain receipts as `pushgate.v1.Receipt`, the one encoding that
//! the gRPC edge streams and the Redis receipts stream stores. Low in the tree so both can use it
//! without the store knowing the edge.

use crate::domain::{Platform, Receipt, ReceiptStatus, epoch_millis};
use crate::proto;

/// A platform as its protobuf enum; `None` for an unspecified or unknown value.
pub fn platform_from_proto(value: i32) -> Option<Platform> {
    match proto::Platform::try_from(value).ok()? {
        proto::Platform::Apns => Some(Platform::Apns),
        proto::Platform::Fcm => Some(Platform::Fcm),
        proto::Platform::Unspecified => None,
    }
}

/// The protobuf enum of a platform.
pub fn platform_to_proto(platform: Platform) -> proto::Platform {
    match platform {
        Platform::Apns => proto::Platform::Apns,
        Platform::Fcm => proto::Platform::Fcm,
    }
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
        ReceiptStatus::Scheduled => proto::ReceiptStatus::Scheduled,
    }
}

/// A domain receipt as `pushgate.v1.Receipt` (its cursor left empty).
pub fn receipt(r: &Receipt) -> proto::Receipt {
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
        scheduled_for_ms: match r.status {
            ReceiptStatus::Scheduled => r.next_attempt_at.map(epoch_millis).unwrap_or(0),
            _ => 0,
        },
        variant: r
            .meta
            .content
            .variant
            .as_deref()
            .unwrap_or_default()
            .to_owned(),
        locale: r
            .meta
            .content
            .locale
            .as_deref()
            .unwrap_or_default()
            .to_owned(),
    }
}
