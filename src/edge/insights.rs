//! The `pushgate.v1.PushGatewayInsights` gRPC service: TrackEvents and GetCampaignStats.
//! Authorized per app exactly like `PushGateway` (a key with the app's send scope); translates
//! protobuf to the insights store's types and the statistics (`crate::insights`) back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{Caller, Scope, forbidden};
use super::convert::invalid_argument;
use crate::domain::FieldError;
use crate::insights::report;
use crate::policy::Policy;
use crate::proto;
use crate::registry::AppRegistry;
use crate::store::insights::{EventKind, Insights, TrackEvent, Tracked};
use crate::wire::platform_to_proto;

/// Events in one TrackEvents call, at most.
pub const MAX_EVENTS: usize = 1_000;
/// Bytes of an event's ids, at most.
const MAX_ID_BYTES: usize = 256;

/// The insights service.
pub struct InsightsApi {
    insights: Arc<dyn Insights>,
    apps: Arc<AppRegistry>,
    /// Whose rule names an open's time zone (as for sends).
    policy: Policy,
}

impl InsightsApi {
    pub fn new(insights: Arc<dyn Insights>, apps: Arc<AppRegistry>, policy: Policy) -> Self {
        Self {
            insights,
            apps,
            policy,
        }
    }

    pub fn into_server(
        self,
    ) -> proto::push_gateway_insights_server::PushGatewayInsightsServer<Self> {
        proto::push_gateway_insights_server::PushGatewayInsightsServer::new(self)
    }

    /// As `PushGateway`: the caller first, then whether the app exists, both answered alike.
    #[allow(clippy::result_large_err)] // tonic::Status
    fn authorize(&self, caller: &Caller, app_id: &str) -> Result<(), Status> {
        if app_id.is_empty() {
            return Err(invalid_argument(vec![FieldError::new(
                "app_id", "required",
            )]));
        }
        caller.authorize(app_id, Scope::Send)?;
        if self.apps.get(app_id).is_none() {
            return Err(forbidden());
        }
        Ok(())
    }
}

/// The domain form of the events, or every field at fault.
fn events_of(
    events: Vec<proto::TrackedEvent>,
    zone_of: impl Fn(&str) -> Result<jiff::tz::TimeZone, String>,
) -> Result<Vec<TrackEvent>, Vec<FieldError>> {
    let mut errors = Vec::new();
    if events.len() > MAX_EVENTS {
        return Err(vec![FieldError::new(
            "events",
            format!("{} events; at most {MAX_EVENTS} per call", events.len()),
        )]);
    }
    let now = crate::domain::epoch_millis(std::time::SystemTime::now());
    let mut out = Vec::with_capacity(events.len());
    for (i, e) in events.into_iter().enumerate() {
        let field = |name: &str| format!("events[{i}].{name}");
        let mut bad = |name: &str, reason: &str| errors.push(FieldError::new(field(name), reason));
        if e.event_id.is_empty() {
            bad("event_id", "required (events are idempotent per id)");
        }
        for (name, value) in [
            ("event_id", &e.event_id),
            ("message_id", &e.message_id),
            ("user_id", &e.user_id),
            ("campaign_id", &e.campaign_id),
        ] {
            if value.len() > MAX_ID_BYTES {
                bad(name, "over 256 bytes");
            }
        }
        let kind = match proto::EventType::try_from(e.r#type) {
            Ok(proto::EventType::Open) => EventKind::Open,
            Ok(proto::EventType::Conversion) => EventKind::Conversion,
            _ => {
                bad("type", "must be OPEN or CONVERSION");
                EventKind::Open
            }
        };
        if kind == EventKind::Open && e.message_id.is_empty() {
            bad("message_id", "an open needs the message id");
        }
        if e.message_id.is_empty() && e.user_id.is_empty() {
            bad("message_id", "a conversion needs a message id or a user id");
        }
        let zone = zone_of(&e.timezone).unwrap_or_else(|reason| {
            bad("timezone", &reason);
            jiff::tz::TimeZone::UTC
        });
        out.push(TrackEvent {
            event_id: e.event_id,
            kind,
            message_id: e.message_id,
            user_id: e.user_id,
            campaign_id: e.campaign_id,
            occurred_at_ms: if e.occurred_at_ms > 0 {
                e.occurred_at_ms
            } else {
                now
            },
            zone,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn result_of(event_id: String, tracked: Tracked) -> proto::TrackEventResult {
    let (counted, reason, campaign_id, variant) = match tracked {
        Tracked::Counted { campaign, variant } => (true, "", campaign, variant),
        Tracked::Duplicate => (false, "duplicate event_id", String::new(), String::new()),
        Tracked::AlreadyCounted { campaign, variant } => (
            false,
            "this exposure already has an event of this type",
            campaign,
            variant,
        ),
        Tracked::OutsideWindow { campaign, variant } => {
            (false, "outside the attribution window", campaign, variant)
        }
        Tracked::Unknown => (
            false,
            "no known exposure for this message or user (not delivered, not a holdout, or forgotten after the attribution window)",
            String::new(),
            String::new(),
        ),
    };
    proto::TrackEventResult {
        event_id,
        counted,
        reason: reason.to_owned(),
        campaign_id,
        variant,
    }
}

fn status_code(s: crate::domain::ReceiptStatus) -> i32 {
    use crate::domain::ReceiptStatus as S;
    (match s {
        S::Delivered => proto::ReceiptStatus::Delivered,
        S::InvalidToken => proto::ReceiptStatus::InvalidToken,
        S::Rejected => proto::ReceiptStatus::Rejected,
        S::Failed => proto::ReceiptStatus::Failed,
        S::Expired => proto::ReceiptStatus::Expired,
        S::Dropped => proto::ReceiptStatus::Dropped,
        S::Retrying => proto::ReceiptStatus::Retrying,
        S::Scheduled => proto::ReceiptStatus::Scheduled,
    }) as i32
}

#[tonic::async_trait]
impl proto::push_gateway_insights_server::PushGatewayInsights for InsightsApi {
    async fn track_events(
        &self,
        request: Request<proto::TrackEventsRequest>,
    ) -> Result<Response<proto::TrackEventsResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.authorize(&caller, &r.app_id)?;
        let events = events_of(r.events, |name| self.policy.zone_of(&r.app_id, name))
            .map_err(invalid_argument)?;
        let tracked = self
            .insights
            .track(&r.app_id, &events)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let results: Vec<_> = events
            .into_iter()
            .zip(tracked)
            .map(|(e, t)| result_of(e.event_id, t))
            .collect();
        let counted = results.iter().filter(|r| r.counted).count();
        Ok(Response::new(proto::TrackEventsResponse {
            results,
            counted: u32::try_from(counted).unwrap_or(u32::MAX),
        }))
    }

    async fn get_campaign_stats(
        &self,
        request: Request<proto::GetCampaignStatsRequest>,
    ) -> Result<Response<proto::CampaignStats>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.authorize(&caller, &r.app_id)?;
        if r.campaign_id.is_empty() {
            return Err(invalid_argument(vec![FieldError::new(
                "campaign_id",
                "required",
            )]));
        }
        let counts = self
            .insights
            .counts(&r.app_id, &r.campaign_id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let control = (!r.control.is_empty()).then_some(r.control.as_str());
        let report = report(&counts, control);
        let variants = report
            .variants
            .into_iter()
            .map(|v| {
                let mut providers: Vec<proto::ProviderStats> = Vec::new();
                for ((platform, status), count) in &v.counts.receipts {
                    let platform = platform_to_proto(*platform) as i32;
                    let at = match providers.iter().position(|p| p.platform == platform) {
                        Some(at) => at,
                        None => {
                            providers.push(proto::ProviderStats {
                                platform,
                                statuses: Vec::new(),
                            });
                            providers.len() - 1
                        }
                    };
                    providers[at].statuses.push(proto::StatusCount {
                        status: status_code(*status),
                        count: *count,
                    });
                }
                let c = v.comparison;
                proto::VariantStats {
                    name: v.name,
                    is_control: v.is_control,
                    providers,
                    sent: v.sent,
                    delivered: v.delivered,
                    failed: v.failed,
                    dropped: v.dropped,
                    holdout: v.holdout,
                    opens: v.counts.opens,
                    conversions: v.counts.conversions,
                    open_rate: v.open_rate,
                    conversion_rate: v.conversion_rate,
                    lift: c.map_or(0.0, |c| c.lift),
                    ci_low: c.map_or(0.0, |c| c.ci_low),
                    ci_high: c.map_or(0.0, |c| c.ci_high),
                    z: c.map_or(0.0, |c| c.z),
                    p_value: c.map_or(0.0, |c| c.p_value),
                    significant: c.is_some_and(|c| c.significant),
                    exposures: v.exposures,
                    compared: c.is_some(),
                }
            })
            .collect();
        Ok(Response::new(proto::CampaignStats {
            campaign_id: r.campaign_id,
            control: report.control.unwrap_or_default(),
            variants,
        }))
    }
}
