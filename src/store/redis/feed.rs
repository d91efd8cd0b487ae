//! The per-app receipts stream: every receipt is appended (pipelined by the queue's writer) to
//! `<prefix>:{app}:receipts`, trimmed to about `redis.receipts_stream_maxlen` entries, as the
//! protobuf-encoded `pushgate.v1.Receipt`. `SubscribeReceipts` with `resume_after` reads it from
//! the cursor on (`0` = the oldest retained, `$` = from now) and then follows it live, so a
//! consumer that reconnects with its last receipt's `cursor` misses nothing and sees nothing
//! twice. Subscriptions share the store's one multiplexed connection (however many there are,
//! they open none of their own, so subscribers cannot exhaust Redis' connections): each reads
//! without blocking, and between reads waits until this replica's writer has appended receipts
//! of the app, or `IDLE_POLL` for receipts other replicas append.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use super::RedisClient;
use crate::proto;
use crate::store::FeedFilter;

/// The stream key of `app`.
pub fn key(prefix: &str, app: &str) -> String {
    format!("{prefix}:{{{app}}}:receipts")
}

/// Deletes the entries of `app`'s stream whose receipt names `user_id` (ForgetUser), reading
/// the whole stream a page at a time; returns how many.
pub async fn forget_user(store: &RedisClient, app: &str, user_id: &str) -> redis::RedisResult<u64> {
    if user_id.is_empty() {
        return Ok(0);
    }
    let key = key(&store.config().key_prefix, app);
    let mut conn = store.conn();
    let mut start = "-".to_string();
    let mut deleted = 0u64;
    loop {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut conn)
            .await?;
        let Some(last) = reply.ids.last().map(|e| e.id.clone()) else {
            return Ok(deleted);
        };
        let theirs: Vec<&str> = reply
            .ids
            .iter()
            .filter(|entry| {
                entry
                    .get::<Vec<u8>>("r")
                    .and_then(|bytes| proto::Receipt::decode(bytes.as_slice()).ok())
                    .is_some_and(|r| r.user_id == user_id)
            })
            .map(|entry| entry.id.as_str())
            .collect();
        if !theirs.is_empty() {
            let n: u64 = redis::cmd("XDEL")
                .arg(&key)
                .arg(&theirs)
                .query_async(&mut conn)
                .await?;
            deleted += n;
        }
        start = format!("({last}");
    }
}

/// True when `filter` wants `r`.
fn wants(filter: &FeedFilter, r: &proto::Receipt) -> bool {
    (filter.include_non_terminal || r.terminal)
        && (filter.campaign_id.is_empty() || r.campaign_id == filter.campaign_id)
}

/// Checks a cursor: `0`, `$`, or a stream id `<ms>-<seq>`.
pub fn valid_cursor(cursor: &str) -> bool {
    if cursor == "0" || cursor == "$" {
        return true;
    }
    match cursor.split_once('-') {
        Some((ms, seq)) => {
            !ms.is_empty()
                && !seq.is_empty()
                && ms.bytes().all(|b| b.is_ascii_digit())
                && seq.bytes().all(|b| b.is_ascii_digit())
        }
        None => !cursor.is_empty() && cursor.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// How long an idle subscription waits before reading again when this replica wrote nothing
/// for its app (receipts appended by other replicas are seen within this).
const IDLE_POLL: Duration = Duration::from_millis(200);
/// Entries read at once.
const PAGE: usize = 512;

/// Receipts of `app` after `cursor`, then live, until the subscriber goes away. `written`
/// changes whenever this replica appended receipts of `app`.
pub fn subscribe(
    store: Arc<RedisClient>,
    app: &str,
    cursor: String,
    filter: FeedFilter,
    mut written: Option<watch::Receiver<()>>,
) -> ReceiverStream<proto::Receipt> {
    let (tx, rx) = mpsc::channel(256);
    let key = key(&store.config().key_prefix, app);
    tokio::spawn(async move {
        let mut last = cursor;
        let mut conn = store.conn();
        loop {
            if tx.is_closed() {
                return;
            }
            if last == "$" {
                // Pin "from now" to a concrete position first, so nothing between reads is
                // missed.
                let tail: redis::RedisResult<redis::streams::StreamRangeReply> =
                    redis::AsyncCommands::xrevrange_count(&mut conn, &key, "+", "-", 1).await;
                match tail {
                    Ok(t) => {
                        last = t
                            .ids
                            .first()
                            .map(|e| e.id.clone())
                            .unwrap_or_else(|| "0".into())
                    }
                    Err(e) => {
                        debug!(error = %e, "receipts subscription: read failed, retrying");
                        tokio::time::sleep(IDLE_POLL).await;
                    }
                }
                continue;
            }
            if let Some(w) = written.as_mut() {
                // Seen from here on: a write after this read wakes the wait below.
                w.borrow_and_update();
            }
            let options = StreamReadOptions::default().count(PAGE);
            let reply: redis::RedisResult<Option<StreamReadReply>> =
                redis::AsyncCommands::xread_options(&mut conn, &[&key], &[&last], &options).await;
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => {
                    debug!(error = %e, "receipts subscription: read failed, retrying");
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
            };
            let entries: Vec<_> = reply
                .map(|r| r.keys)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|stream| stream.ids)
                .collect();
            let caught_up = entries.len() < PAGE;
            for entry in entries {
                let bytes: Option<Vec<u8>> = entry.get("r");
                last = entry.id.clone();
                let Some(bytes) = bytes else { continue };
                let Ok(mut receipt) = proto::Receipt::decode(bytes.as_slice()) else {
                    continue;
                };
                if !wants(&filter, &receipt) {
                    continue;
                }
                receipt.cursor = entry.id;
                if tx.send(receipt).await.is_err() {
                    return;
                }
            }
            if caught_up {
                let woken = async {
                    match written.as_mut() {
                        Some(w) => w.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = tokio::time::sleep(IDLE_POLL) => {}
                    () = tx.closed() => return,
                    alive = woken => if !alive {
                        // The writer ended (shutdown): poll only.
                        written = None;
                    },
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The stream entry payload of a receipt.
pub fn encode(receipt: &crate::domain::Receipt) -> Vec<u8> {
    crate::wire::receipt(receipt).encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors() {
        for ok in ["0", "$", "1700000000000-0", "1700000000000"] {
            assert!(valid_cursor(ok), "{ok}");
        }
        for bad in ["", "-", "1-", "-1", "a-1", "1-b", "+"] {
            assert!(!valid_cursor(bad), "{bad}");
        }
    }
}
