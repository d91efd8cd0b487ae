//! The `pushgate.v1.PushGatewayPolicy` gRPC service: dead tokens (ListInvalidTokens), consent
//! (SetOptOut, ClearOptOut), erasure (ForgetUser: the policy state, campaign measurement,
//! scheduled messages and the receipts stream) and cancellation of scheduled messages
//! (CancelScheduled). Authorized per app with the send scope,
//! exactly like `PushGateway`: the caller's key must be one of the app's `api_keys` or
//! `admin_keys`, checked before the app is looked up.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::{Caller, Scope, forbidden};
use crate::policy::Policy;
use crate::proto;
use crate::store::insights::Insights;
use crate::store::policy_state::{PolicyState, TokenCursor};
use crate::store::{Scheduled, Store, StoreError};

/// Tokens one ListInvalidTokens streams by default, and at most.
const DEFAULT_LIMIT: usize = 1_000;
const MAX_LIMIT: usize = 10_000;
/// Tokens read from the state per page while streaming.
const PAGE: usize = 500;

/// The policy service.
pub struct PolicyApi {
    state: Arc<dyn PolicyState>,
    store: Arc<dyn Store>,
    insights: Arc<dyn Insights>,
    apps: HashSet<String>,
}

impl PolicyApi {
    /// The service over `policy`'s state; `None` when the stage keeps none.
    pub fn new(
        policy: &Policy,
        store: Arc<dyn Store>,
        insights: Arc<dyn Insights>,
        apps: impl IntoIterator<Item = String>,
    ) -> Option<Self> {
        Some(Self {
            state: Arc::clone(policy.state()?),
            store,
            insights,
            apps: apps.into_iter().collect(),
        })
    }

    pub fn into_server(self) -> proto::push_gateway_policy_server::PushGatewayPolicyServer<Self> {
        proto::push_gateway_policy_server::PushGatewayPolicyServer::new(self)
    }

    /// SetOptOut (`opted_out` true) and ClearOptOut (false).
    async fn opt_out(
        &self,
        request: Request<proto::OptOutRequest>,
        opted_out: bool,
    ) -> Result<Response<proto::OptOutResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.check_app(&caller, &r.app_id)?;
        user_id(&r.user_id)?;
        let changed = self
            .state
            .set_opt_out(&r.app_id, &r.user_id, opted_out)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(proto::OptOutResponse { changed }))
    }

    #[allow(clippy::result_large_err)] // tonic::Status
    fn check_app(&self, caller: &Caller, app: &str) -> Result<(), Status> {
        if app.is_empty() {
            return Err(Status::invalid_argument("app_id: required"));
        }
        caller.authorize(app, Scope::Send)?;
        if self.apps.contains(app) {
            Ok(())
        } else {
            Err(forbidden())
        }
    }
}

#[allow(clippy::result_large_err)] // tonic::Status
fn user_id(user_id: &str) -> Result<(), Status> {
    if user_id.is_empty() {
        return Err(Status::invalid_argument("user_id: required"));
    }
    Ok(())
}

fn unavailable(e: StoreError) -> Status {
    Status::unavailable(e.to_string())
}

/// A token's cursor: when it was reported and the token, `<ms>:<token>`.
fn cursor_of(since_ms: i64, token: &str) -> String {
    format!("{since_ms}:{token}")
}

#[allow(clippy::result_large_err)] // tonic::Status
fn parse_cursor(text: &str) -> Result<Option<TokenCursor>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument("after: must be a cursor from an earlier InvalidToken");
    let (ms, token) = text.split_once(':').ok_or_else(bad)?;
    let ms: i64 = ms.parse().map_err(|_| bad())?;
    Ok(Some((ms, token.to_owned())))
}

type TokenStream = Pin<Box<dyn Stream<Item = Result<proto::InvalidToken, Status>> + Send>>;

#[tonic::async_trait]
impl proto::push_gateway_policy_server::PushGatewayPolicy for PolicyApi {
    type ListInvalidTokensStream = TokenStream;

    async fn list_invalid_tokens(
        &self,
        request: Request<proto::ListInvalidTokensRequest>,
    ) -> Result<Response<Self::ListInvalidTokensStream>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.check_app(&caller, &r.app_id)?;
        let mut after = parse_cursor(&r.after)?;
        let limit = match r.limit {
            0 => DEFAULT_LIMIT,
            n => (n as usize).min(MAX_LIMIT),
        };
        let state = Arc::clone(&self.state);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut left = limit;
            while left > 0 {
                let page = match state
                    .dead_tokens(&r.app_id, r.since_ms, after.clone(), left.min(PAGE))
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(e))).await;
                        return;
                    }
                };
                let Some(last) = page.last() else { return };
                after = Some((last.reported_at_ms, last.device_token.clone()));
                let full = page.len() == left.min(PAGE);
                left -= page.len();
                for t in page {
                    let item = proto::InvalidToken {
                        cursor: cursor_of(t.reported_at_ms, &t.device_token),
                        device_token: t.device_token,
                        invalid_since_ms: t.since_ms,
                        reported_at_ms: t.reported_at_ms,
                    };
                    if tx.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
                if !full {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn set_opt_out(
        &self,
        request: Request<proto::OptOutRequest>,
    ) -> Result<Response<proto::OptOutResponse>, Status> {
        self.opt_out(request, true).await
    }

    async fn clear_opt_out(
        &self,
        request: Request<proto::OptOutRequest>,
    ) -> Result<Response<proto::OptOutResponse>, Status> {
        self.opt_out(request, false).await
    }

    async fn cancel_scheduled(
        &self,
        request: Request<proto::CancelScheduledRequest>,
    ) -> Result<Response<proto::CancelScheduledResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.check_app(&caller, &r.app_id)?;
        let given = [
            !r.campaign_id.is_empty(),
            !r.batch_id.is_empty(),
            !r.message_ids.is_empty(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(Status::invalid_argument(
                "campaign_id, batch_id, message_ids: set exactly one",
            ));
        }
        if r.message_ids.len() > MAX_LIMIT {
            return Err(Status::invalid_argument(format!(
                "message_ids: at most {MAX_LIMIT} per call"
            )));
        }
        let which = if !r.campaign_id.is_empty() {
            Scheduled::Campaign(r.campaign_id)
        } else if !r.batch_id.is_empty() {
            Scheduled::Batch(r.batch_id)
        } else {
            Scheduled::Messages(r.message_ids)
        };
        let cancelled = self
            .store
            .cancel_scheduled(&r.app_id, &which)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(proto::CancelScheduledResponse { cancelled }))
    }

    async fn forget_user(
        &self,
        request: Request<proto::ForgetUserRequest>,
    ) -> Result<Response<proto::ForgetUserResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.check_app(&caller, &r.app_id)?;
        user_id(&r.user_id)?;
        let forgotten = self
            .state
            .forget_user(&r.app_id, &r.user_id)
            .await
            .map_err(unavailable)?;
        let events = self
            .insights
            .forget_user(&r.app_id, &r.user_id)
            .await
            .map_err(unavailable)?;
        let scheduled_erased = self
            .store
            .cancel_scheduled(&r.app_id, &Scheduled::User(r.user_id.clone()))
            .await
            .map_err(unavailable)?;
        // After the scheduled messages: their DROPPED receipts carry no user id.
        let receipts_erased = self
            .store
            .forget_receipts(&r.app_id, &r.user_id)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(proto::ForgetUserResponse {
            opt_out_erased: forgotten.opt_out,
            cap_sends_erased: forgotten.cap_sends,
            scheduled_erased,
            receipts_erased,
            suppressed_tokens_erased: forgotten.suppressed_tokens,
            exposures_erased: events.exposures,
            events_erased: events.events,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let c = cursor_of(1_700_000_000_123, "ab:cd");
        assert_eq!(
            parse_cursor(&c).unwrap(),
            Some((1_700_000_000_123, "ab:cd".to_owned()))
        );
        assert_eq!(parse_cursor("").unwrap(), None);
        assert!(parse_cursor("nope").is_err());
        assert!(parse_cursor("x:y").is_err());
    }
}
