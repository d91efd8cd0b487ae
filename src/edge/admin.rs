//! The `pushgate.v1.PushGatewayAdmin` gRPC service: dead-letter list, replay and purge. Served
//! only when the store keeps dead letters (durable delivery).

use std::collections::HashSet;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::{Caller, Scope, forbidden};
use crate::proto;
use crate::store::{DeadLetters, Store, StoreError};
use crate::wire::platform_to_proto;

/// The admin service.
pub struct AdminApi {
    store: Arc<dyn Store>,
    apps: HashSet<String>,
    /// Dead letters one replay may touch, at most.
    max_replay: usize,
}

impl AdminApi {
    /// The service over `store`'s dead letters; `None` when the store keeps none.
    pub fn new(
        store: Arc<dyn Store>,
        apps: impl IntoIterator<Item = String>,
        max_replay: usize,
    ) -> Option<Self> {
        store.dead_letters()?;
        Some(Self {
            store,
            apps: apps.into_iter().collect(),
            max_replay: max_replay.max(1),
        })
    }

    pub fn into_server(self) -> proto::push_gateway_admin_server::PushGatewayAdminServer<Self> {
        proto::push_gateway_admin_server::PushGatewayAdminServer::new(self)
    }

    fn letters(&self) -> Result<&dyn DeadLetters, Status> {
        self.store
            .dead_letters()
            .ok_or_else(|| Status::unimplemented("this store keeps no dead letters"))
    }

    /// Authorizes the caller for `app` with the admin scope, then checks the app exists; both
    /// failures get the same answer ([`forbidden`]).
    #[allow(clippy::result_large_err)] // tonic::Status
    fn check_app(&self, caller: &Caller, app: &str) -> Result<(), Status> {
        if app.is_empty() {
            return Err(Status::invalid_argument("app_id: required"));
        }
        caller.authorize(app, Scope::Admin)?;
        if self.apps.contains(app) {
            Ok(())
        } else {
            Err(forbidden())
        }
    }
}

fn unavailable(e: StoreError) -> Status {
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl proto::push_gateway_admin_server::PushGatewayAdmin for AdminApi {
    async fn list_dead_letters(
        &self,
        request: Request<proto::ListDeadLettersRequest>,
    ) -> Result<Response<proto::ListDeadLettersResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.check_app(&caller, &r.app_id)?;
        let limit = match r.limit {
            0 => 100,
            n => n.min(1_000),
        } as usize;
        let (letters, total) = self
            .letters()?
            .list(&r.app_id, r.offset as usize, limit)
            .await
            .map_err(unavailable)?;
        let dead_letters = letters
            .into_iter()
            .map(|l| {
                let mut out = proto::DeadLetter {
                    message_id: l.message_id,
                    last_error: l.last_error,
                    dead_at_ms: l.dead_at_ms,
                    ..Default::default()
                };
                if let Some(job) = l.job {
                    out.batch_id = job.batch_id;
                    out.campaign_id = job.campaign_id;
                    out.platform = platform_to_proto(job.platform) as i32;
                    out.attempts = job.attempt;
                    out.accepted_at_ms = job.accepted_at_ms;
                    out.user_id = job.user_id;
                }
                out
            })
            .collect();
        Ok(Response::new(proto::ListDeadLettersResponse {
            dead_letters,
            total,
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<proto::ReplayDeadLettersRequest>,
    ) -> Result<Response<proto::ReplayDeadLettersResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.check_app(&caller, &r.app_id)?;
        if r.message_ids.len() > self.max_replay {
            return Err(Status::invalid_argument(format!(
                "message_ids: {} ids; one replay takes at most {} (pipeline.max_replay_dead_letters)",
                r.message_ids.len(),
                self.max_replay
            )));
        }
        let limit = match r.limit {
            0 => self.max_replay,
            n => (n as usize).min(self.max_replay),
        };
        let replayed = self
            .letters()?
            .replay(&r.app_id, &r.message_ids, limit)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(proto::ReplayDeadLettersResponse { replayed }))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<proto::PurgeDeadLettersRequest>,
    ) -> Result<Response<proto::PurgeDeadLettersResponse>, Status> {
        let caller = Caller::of(&request);
        let r = request.into_inner();
        self.check_app(&caller, &r.app_id)?;
        let purged = self
            .letters()?
            .purge(&r.app_id, &r.message_ids)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(proto::PurgeDeadLettersResponse { purged }))
    }
}
