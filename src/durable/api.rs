//! The `pushgate.v1.PushGatewayAdmin` gRPC service: dead-letter list, replay and purge. Served
//! only when durable delivery (Redis) is configured.

use std::collections::HashSet;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{RedisStore, admin};
use crate::model::Platform;
use crate::proto;

/// The admin service.
pub struct AdminApi {
    store: Arc<RedisStore>,
    apps: HashSet<String>,
}

impl AdminApi {
    pub fn new(store: Arc<RedisStore>, apps: impl IntoIterator<Item = String>) -> Self {
        Self {
            store,
            apps: apps.into_iter().collect(),
        }
    }

    pub fn into_server(self) -> proto::push_gateway_admin_server::PushGatewayAdminServer<Self> {
        proto::push_gateway_admin_server::PushGatewayAdminServer::new(self)
    }

    fn check_app(&self, app: &str) -> Result<(), Status> {
        if self.apps.contains(app) {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "app_id: unknown app `{app}`"
            )))
        }
    }
}

fn unavailable(e: redis::RedisError) -> Status {
    Status::unavailable(format!("redis: {e}"))
}

#[tonic::async_trait]
impl proto::push_gateway_admin_server::PushGatewayAdmin for AdminApi {
    async fn list_dead_letters(
        &self,
        request: Request<proto::ListDeadLettersRequest>,
    ) -> Result<Response<proto::ListDeadLettersResponse>, Status> {
        let r = request.into_inner();
        self.check_app(&r.app_id)?;
        let limit = match r.limit {
            0 => 100,
            n => n.min(1_000),
        } as usize;
        let (letters, total) = admin::list(&self.store, &r.app_id, r.offset as usize, limit)
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
                    out.batch_id = job.batch_id.clone();
                    out.campaign_id = job.campaign_id.clone();
                    out.platform = match job.platform() {
                        Platform::Apns => proto::Platform::Apns,
                        Platform::Fcm => proto::Platform::Fcm,
                    } as i32;
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
        let r = request.into_inner();
        self.check_app(&r.app_id)?;
        let limit = match r.limit {
            0 => 1_000,
            n => n,
        } as usize;
        let replayed = admin::replay(&self.store, &r.app_id, &r.message_ids, limit)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(proto::ReplayDeadLettersResponse { replayed }))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<proto::PurgeDeadLettersRequest>,
    ) -> Result<Response<proto::PurgeDeadLettersResponse>, Status> {
        let r = request.into_inner();
        self.check_app(&r.app_id)?;
        let purged = admin::purge(&self.store, &r.app_id, &r.message_ids)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(proto::PurgeDeadLettersResponse { purged }))
    }
}
