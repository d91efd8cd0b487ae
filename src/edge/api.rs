//! `pushgate.v1.PushGateway` over tonic: SendBatch, StreamSend and SubscribeReceipts. Translates
//! protobuf to domain types and back (`convert`), maps errors to `tonic::Status` with field
//! violations, and holds no business logic.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::auth::{Caller, Scope, forbidden};
use super::convert::{into_batch, invalid_argument, outline_of, to_proto_response};
use super::quota::Quotas;
use crate::domain::FieldError;
use crate::ingest::{Ingest, SubmitError};
use crate::proto;
use crate::receipts::{ReceiptEnvelope, ReceiptHub};
use crate::registry::AppRegistry;
use crate::store::{FeedError, FeedFilter, Store};
use crate::wire::receipt as to_proto_receipt;

type ReceiptStream = Pin<Box<dyn Stream<Item = Result<proto::Receipt, Status>> + Send>>;

/// The receipts queued for one `StreamSend` caller, shared by the stream that sends them and
/// the task that reads the caller's batches, so the reader can stop while too many wait.
struct ReceiptQueue {
    receiver: parking_lot::Mutex<mpsc::UnboundedReceiver<ReceiptEnvelope>>,
    cap: usize,
    taken: Notify,
}

impl ReceiptQueue {
    fn new(receiver: mpsc::UnboundedReceiver<ReceiptEnvelope>, cap: usize) -> Self {
        Self {
            receiver: parking_lot::Mutex::new(receiver),
            cap: cap.max(1),
            taken: Notify::new(),
        }
    }

    fn poll_next(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ReceiptEnvelope>> {
        let mut receiver = self.receiver.lock();
        let next = receiver.poll_recv(cx);
        if next.is_ready() && receiver.len() < self.cap {
            self.taken.notify_one();
        }
        next
    }

    /// Returns once fewer than the cap are queued.
    async fn below_cap(&self) {
        loop {
            // Created before the check: a receipt taken in between leaves a permit behind.
            let taken = self.taken.notified();
            if self.receiver.lock().len() < self.cap {
                return;
            }
            taken.await;
        }
    }
}

/// The `PushGateway` service.
pub struct Api {
    ingest: Arc<Ingest>,
    hub: Arc<ReceiptHub>,
    store: Arc<dyn Store>,
    apps: Arc<AppRegistry>,
    /// Per-key ingress limits (none unless [`Api::with_quotas`]).
    quotas: Arc<Quotas>,
}

impl Api {
    /// Authorizes `caller` for `app_id` first, then checks the app exists; both failures get
    /// the same answer ([`forbidden`]). An empty `app_id` is an INVALID_ARGUMENT.
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

    pub fn new(
        ingest: Arc<Ingest>,
        hub: Arc<ReceiptHub>,
        store: Arc<dyn Store>,
        apps: Arc<AppRegistry>,
    ) -> Self {
        Self {
            ingest,
            hub,
            store,
            apps,
            quotas: Arc::new(Quotas::unlimited()),
        }
    }

    /// Recipients a request may carry before it is refused undecoded (`batch_guard`).
    pub fn wire_recipient_limit(&self) -> usize {
        super::batch_guard::refuse_above(self.ingest.max_batch_recipients())
    }

    /// Applies per-key ingress limits (`[ingress]`).
    pub fn with_quotas(mut self, quotas: Arc<Quotas>) -> Self {
        self.quotas = quotas;
        self
    }

    /// The tonic server for this service. A request larger than `max_request_bytes` is refused
    /// (OUT_OF_RANGE) before it is decoded; responses (receipts of a large batch) may be up to
    /// 64 MiB.
    pub fn into_server(
        self,
        max_request_bytes: usize,
    ) -> proto::push_gateway_server::PushGatewayServer<Self> {
        proto::push_gateway_server::PushGatewayServer::new(self)
            .max_decoding_message_size(max_request_bytes)
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
        self.authorize(&caller, &request.app_id)?;
        if let Some(who) = caller.key_id() {
            self.quotas.admit_batch(who, request.recipients.len())?;
        }
        let wait = request.wait_for_receipts;
        let mut batch = into_batch(request).map_err(invalid_argument)?;
        let (sink, mut receipts) = mpsc::unbounded_channel::<ReceiptEnvelope>();
        let mut collected = Vec::new();
        // The batch is submitted in a task of its own, so a call that is cancelled or runs past
        // its deadline (this future dropped) does not drop ingest half-way with ids claimed:
        // the guard tells it the call ended, recipients not admitted yet are refused and their
        // ids released, and what was admitted is delivered.
        let call_ended = CancellationToken::new();
        let _ended_on_drop = call_ended.clone().drop_guard();
        let ingest = Arc::clone(&self.ingest);
        let task_sink = wait.then(|| sink.clone());
        let mut submit = tokio::spawn(async move {
            ingest
                .submit_until(&mut batch, task_sink.as_ref(), false, &call_ended)
                .await
        });
        let result = loop {
            // Collect receipts while submitting: receipts hold window slots, so a batch larger
            // than the window would otherwise wait on itself.
            tokio::select! {
                result = &mut submit => break result,
                Some(envelope) = receipts.recv() => {
                    if answers(&envelope.receipt) {
                        collected.push(to_proto_receipt(&envelope.receipt));
                    }
                }
            }
        };
        drop(sink);
        let result = result
            .map_err(|e| Status::internal(format!("the batch's task ended: {e}")))?
            .map_err(submit_status)?;
        if wait {
            while let Some(envelope) = receipts.recv().await {
                if answers(&envelope.receipt) {
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
        let who = caller.key_id();
        // Counted until the receipt stream is dropped (the call ended).
        // Held by the response stream, and given back early when the call is ended for unread
        // receipts (HTTP/2 may keep that stream until the caller's connection closes).
        let slot = Arc::new(parking_lot::Mutex::new(
            who.map(|w| self.quotas.open_stream(w)).transpose()?,
        ));
        let slot_of_reader = Arc::clone(&slot);
        let mut inbound = request.into_inner();
        let (sink, receipts) = mpsc::unbounded_channel::<ReceiptEnvelope>();
        let ingest = Arc::clone(&self.ingest);
        let apps = Arc::clone(&self.apps);
        let quotas = Arc::clone(&self.quotas);
        // Receipts of accepted messages hold window slots, so the window bounds them; REJECTED
        // ones hold none, so a caller that never reads would grow the queue without end. The
        // caller's batches are not read while too many receipts wait.
        let queue = Arc::new(ReceiptQueue::new(receipts, ingest.max_unread_receipts()));
        let outbound = Arc::clone(&queue);
        // Why the gateway stopped reading the caller's batches (a request refused on the wire,
        // say), told after the last receipt; dropped unsent when the caller simply finished.
        let (ended_with, inbound_error) = tokio::sync::oneshot::channel::<Status>();
        // Cancelled when the response stream is dropped: the call ended on the caller's side.
        let call_gone = tokio_util::sync::CancellationToken::new();
        let call_open = call_gone.clone().drop_guard();
        // Cancelled when the caller took no receipt for `stream_unread_timeout` while the queue
        // was full: the response ends at once with the reader's status.
        let abandoned = tokio_util::sync::CancellationToken::new();
        let give_up = abandoned.clone();
        let unread_timeout = ingest.stream_unread_timeout();
        let mut ended_with = Some(ended_with);
        tokio::spawn(async move {
            let stopping = ingest.stopping();
            loop {
                tokio::select! {
                    () = queue.below_cap() => {}
                    _ = stopping.cancelled() => break,
                    // The caller went away without reading: stop, so the stream (its slot, its
                    // unread receipts and the HTTP/2 window its unread batches hold on the
                    // caller's connection) is released instead of waiting here for ever.
                    _ = call_gone.cancelled() => break,
                    // A caller that keeps its call open and reads nothing (a client that
                    // dropped the response while its request side still had batches to send
                    // does so): end the call, which releases the same.
                    () = tokio::time::sleep(unread_timeout) => {
                        if let Some(tell) = ended_with.take() {
                            let _ = tell.send(Status::resource_exhausted(format!(
                                "pipeline.max_unread_receipts ({}) receipts were left unread for \
                                 {} s (pipeline.stream_unread_timeout_secs): the call is ended; \
                                 the receipts of accepted messages go to SubscribeReceipts",
                                ingest.max_unread_receipts(),
                                unread_timeout.as_secs()
                            )));
                        }
                        give_up.cancel();
                        slot_of_reader.lock().take();
                        break;
                    }
                }
                // Not reading while `submit` waits for window room is the backpressure: HTTP/2
                // flow control then slows the caller.
                let next = tokio::select! {
                    next = inbound.message() => next,
                    _ = stopping.cancelled() => break,
                    _ = call_gone.cancelled() => break,
                };
                let request = match next {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        debug!(%status, "StreamSend inbound ended with an error");
                        if let Some(tell) = ended_with.take() {
                            let _ = tell.send(status);
                        }
                        break;
                    }
                };
                let outline = outline_of(&request);
                let allowed = caller
                    .authorize(&request.app_id, Scope::Send)
                    .and_then(|()| apps.get(&request.app_id).map(drop).ok_or_else(forbidden));
                if let Err(status) = allowed {
                    // Answered to this caller only: receipts of an app it may not use must not
                    // reach that app's subscribers.
                    let error = FieldError::new("app_id", status.message());
                    ingest.deny_batch(outline, &error, &sink);
                    continue;
                }
                // Over its key's rates, a stream is paced, not refused: the next batch is read
                // once they allow this one.
                if let Some(who) = who {
                    tokio::select! {
                        () = quotas.pace_batch(who, request.recipients.len()) => {}
                        _ = stopping.cancelled() => break,
                    }
                }
                let outcome = match into_batch(request) {
                    Ok(mut batch) => ingest
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
                    ingest.refuse_batch(outline, &errors, &sink);
                }
            }
        });
        let stream = futures::stream::poll_fn(move |cx| {
            let _open = &slot;
            let _call = &call_open;
            outbound.poll_next(cx)
        })
        .take_until(abandoned.cancelled_owned())
        // The envelope, and with it the window slot, is released as the receipt leaves.
        .map(|envelope| Ok(to_proto_receipt(&envelope.receipt)))
        .chain(
            futures::stream::once(inbound_error)
                .filter_map(|ended| async move { ended.ok().map(Err) }),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    type SubscribeReceiptsStream = ReceiptStream;

    async fn subscribe_receipts(
        &self,
        request: Request<proto::SubscribeReceiptsRequest>,
    ) -> Result<Response<Self::SubscribeReceiptsStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        self.authorize(&caller, &request.app_id)?;
        // Counted until the stream is dropped (the subscriber went away).
        let slot = caller
            .key_id()
            .map(|w| self.quotas.open_subscription(w))
            .transpose()?;
        if !request.resume_after.is_empty() {
            let filter = FeedFilter {
                campaign_id: request.campaign_id,
                include_non_terminal: request.include_non_terminal,
            };
            return match self
                .store
                .receipts_feed(&request.app_id, request.resume_after, filter)
            {
                Ok(feed) => Ok(Response::new(Box::pin(feed.map(move |r| {
                    let _open = &slot;
                    Ok(r)
                })))),
                Err(e @ FeedError::Unsupported) => Err(Status::failed_precondition(e.to_string())),
                Err(e @ FeedError::BadCursor) => Err(invalid_argument(vec![FieldError::new(
                    "resume_after",
                    e.to_string(),
                )])),
            };
        }
        let campaign = request.campaign_id;
        let include_non_terminal = request.include_non_terminal;
        let stream =
            BroadcastStream::new(self.hub.subscribe(&request.app_id)).filter_map(move |item| {
                let _open = &slot;
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

/// Whether a receipt goes into a SendBatch response: terminal ones, and the SCHEDULED receipt of
/// a message that waits for its send time (its terminal receipt comes later, to subscribers).
fn answers(receipt: &crate::domain::Receipt) -> bool {
    receipt.terminal() || receipt.status == crate::domain::ReceiptStatus::Scheduled
}

fn submit_status(error: SubmitError) -> Status {
    match error {
        SubmitError::Invalid(e) => invalid_argument(vec![e]),
        SubmitError::Unavailable(reason) => Status::unavailable(reason),
    }
}
