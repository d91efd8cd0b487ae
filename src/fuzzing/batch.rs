//! Targets over whole batches: a request's decoding and conversion, ingest's validation of it,
//! rendering for APNs and FCM, and the packed form a waiting message keeps.
//!
//! [`check_batch`] runs a batch through what ingest does before it accepts a recipient, in
//! ingest's order and with its functions (`RequestCaps::check`, `Timing::of`,
//! `CompiledTemplate::compile`, the fixed-size bound, content assignment, rendering,
//! `Policy::inspect`, packing), then restores the packed recipients as a durable store does
//! after a crash (`AcceptedBatch::restore`, which compiles the template again from its source)
//! and renders each again. What ingest validated must be what is sent: the second rendering
//! must equal the first.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use prost::Message;

use super::Fields;
use crate::backoff::RetryConfig;
use crate::domain::{Batch, Platform, Priority, ProviderRequest, PushType, Recipient, Template};
use crate::edge::convert;
use crate::ingest::RequestCaps;
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicySettings, Timing};
use crate::receipts::ReceiptHub;
use crate::registry::AppRuntime;
use crate::render::content::Choice;
use crate::render::{
    CompiledTemplate, MAX_COLLAPSE_KEY_BYTES, MAX_FCM_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES,
    RecipientRef, RenderContext, Stamp,
};
use crate::store::policy_state::MemoryPolicyState;
use crate::work::{AcceptedBatch, PackedRecipients};

/// Recipients of one input rendered at most (the caps are checked on all of them).
const MAX_RECIPIENTS: usize = 32;
const TOPIC: &str = "com.example.app";

struct Fixture {
    policy: Policy,
    app: Arc<AppRuntime>,
    hub: Arc<ReceiptHub>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let metrics = Arc::new(Metrics::new());
    Fixture {
        policy: Policy::new(
            PolicySettings::default(),
            Arc::new(MemoryPolicyState::new(60_000)),
            Arc::clone(&metrics),
        ),
        app: Arc::new(AppRuntime {
            id: "app".into(),
            apns_topic: TOPIC.into(),
            apns: None,
            fcm: None,
            retry: RetryConfig::default(),
        }),
        hub: Arc::new(ReceiptHub::new(metrics)),
    }
});

/// When the batch was accepted: fixed, so a failure replays identically.
fn started() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// A `SendBatchRequest` as the gRPC edge receives it (SendBatch and each StreamSend message):
/// decoding never panics; a request the edge refuses as a whole names every bad field and its
/// outline still lists every recipient (each gets its REJECTED receipt); a converted batch keeps
/// every recipient and goes through [`check_batch`].
pub fn request(data: &[u8]) {
    let Ok(request) = crate::proto::SendBatchRequest::decode(data) else {
        return;
    };
    let outline = convert::outline_of(&request);
    let count = request.recipients.len();
    assert_eq!(outline.recipients.len(), count);
    match convert::into_batch(request) {
        Ok(batch) => {
            assert_eq!(batch.recipients.len(), count);
            check_batch(&batch);
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "refused without a reason");
            assert!(errors.iter().all(|e| !e.field.is_empty()), "{errors:?}");
        }
    }
}

/// A template and one recipient's fields, rendered for an APNs and an FCM recipient through
/// [`check_batch`]. Fields (NUL-separated): options, title, subtitle, body, data (`k=v` lines),
/// template apns_json, template fcm_json, device token, vars (`k=v` lines), recipient
/// apns_json, recipient fcm_json, title override, body override, image_url, deep_link, sound,
/// collapse_key, category, thread_id, android_channel_id, message_id. Options are letters:
/// `b` background, `v` voip, `l` live activity, `h` high and `n` normal priority, `c`
/// content-available, `m` mutable-content, `t` a one-hour ttl, `T` a 40-day ttl, `o`/`O`
/// override the title/body, digits a badge.
pub fn render(data: &[u8]) {
    let f = Fields::parse(data);
    check_batch(&batch_of(&f));
}

fn batch_of(f: &Fields) -> Batch {
    let options = f.get(0);
    let has = |c: char| options.contains(c);
    let badge: String = options
        .chars()
        .filter(char::is_ascii_digit)
        .take(9)
        .collect();
    let template = Template {
        title: f.get(1).into(),
        subtitle: f.get(2).into(),
        body: f.get(3).into(),
        data: super::lines(f.get(4)),
        apns_json: f.get(5).into(),
        fcm_json: f.get(6).into(),
        image_url: f.get(13).into(),
        deep_link: f.get(14).into(),
        sound: f.get(15).into(),
        collapse_key: f.get(16).into(),
        category: f.get(17).into(),
        thread_id: f.get(18).into(),
        android_channel_id: f.get(19).into(),
        badge: badge.parse().ok(),
        ttl: if has('T') {
            Some(Duration::from_secs(40 * 86_400))
        } else {
            has('t').then(|| Duration::from_secs(3_600))
        },
        priority: if has('h') {
            Priority::High
        } else if has('n') {
            Priority::Normal
        } else {
            Priority::Default
        },
        push_type: if has('b') {
            Some(PushType::Background)
        } else if has('v') {
            Some(PushType::Voip)
        } else if has('l') {
            Some(PushType::LiveActivity)
        } else {
            None
        },
        content_available: has('c'),
        mutable_content: has('m'),
        ..Template::default()
    };
    let recipient = |platform: Platform, n: usize| Recipient {
        message_id: match f.get(20) {
            "" => format!("m-{n}"),
            id => format!("{id}{n}"),
        },
        platform,
        device_token: f.get(7).into(),
        vars: super::lines(f.get(8)),
        user_id: format!("user-{n}"),
        locale: String::new(),
        timezone: String::new(),
        apns_json: f.get(9).into(),
        fcm_json: f.get(10).into(),
        title: has('o').then(|| f.get(11).into()),
        body: has('O').then(|| f.get(12).into()),
        token_registered_at_ms: 0,
        send_at_ms: 0,
    };
    Batch {
        app_id: "app".into(),
        batch_id: "b".into(),
        campaign_id: "spring-sale".into(),
        template,
        recipients: vec![recipient(Platform::Apns, 0), recipient(Platform::Fcm, 1)],
        campaign_rate_per_minute: 0,
        bypass_policies: false,
        send_at_ms: 0,
        local_send_time: String::new(),
        late_sends_now: false,
        optimal_send_time: false,
    }
}

/// See the module docs. Asserts: every refusal names a field; a template whose fixed text is
/// over every provider's limit (ingest refuses such a batch once) renders for no recipient; every
/// rendered request obeys [`check_request`]; the packed and restored recipient renders to the
/// same request and identity.
fn check_batch(batch: &Batch) {
    if let Err(e) = RequestCaps::default().check(batch) {
        assert!(!e.field.is_empty(), "{e:?}");
        return;
    }
    let Ok(timing) = Timing::of(batch) else {
        return;
    };
    let compiled = match CompiledTemplate::compile(&batch.template) {
        Ok(compiled) => compiled,
        Err(e) => {
            assert!(!e.field.is_empty(), "{e:?}");
            return;
        }
    };
    let overridden = batch
        .recipients
        .iter()
        .any(|r| r.title.is_some() || r.body.is_some());
    let hopeless = compiled.min_payload_bytes(overridden) > MAX_PAYLOAD_BYTES;
    let ctx = RenderContext {
        apns_topic: TOPIC.into(),
        analytics_label: (!batch.campaign_id.is_empty()).then(|| batch.campaign_id.clone()),
    };
    let fixture = &*FIXTURE;
    let mut packed = PackedRecipients::default();
    let mut sent = Vec::new();
    for (index, r) in batch.recipients.iter().enumerate().take(MAX_RECIPIENTS) {
        let message_id = match r.message_id.as_str() {
            "" => format!("generated-{index}"),
            id => id.to_owned(),
        };
        let choice =
            compiled
                .contents()
                .choose(&batch.campaign_id, &r.user_id, &message_id, &r.locale);
        let set = match choice {
            Choice::Send { set } => set,
            Choice::Holdout => 0,
        };
        let mut recipient = RecipientRef::from(r);
        recipient.content = set;
        let stamp = Stamp {
            message_id: &message_id,
            accepted_at: started(),
        };
        let request = match compiled.render_ref(recipient, index, stamp, &ctx) {
            Ok(request) => request,
            Err(e) => {
                assert!(!e.field.is_empty(), "{e:?}");
                continue;
            }
        };
        assert!(
            !hopeless,
            "min_payload_bytes says no recipient fits, yet recipient {index} rendered"
        );
        check_request(&request, r, &batch.template);
        if fixture
            .policy
            .inspect(&fixture.app.id, r, index, &timing)
            .is_err()
        {
            continue;
        }
        if let Choice::Send { set } = choice
            && let Some(at) = packed.push(r, &message_id, index, set, &compiled)
        {
            sent.push((at, message_id, request, r));
        }
    }
    if sent.is_empty() {
        return;
    }
    let mut accepted = AcceptedBatch::new(
        Arc::clone(&fixture.app),
        batch.batch_id.as_str().into(),
        batch.campaign_id.as_str().into(),
        batch.template.clone(),
        compiled,
        ctx.clone(),
        batch.template.ttl,
        batch.campaign_rate_per_minute,
        None,
        Arc::clone(&fixture.hub),
    );
    accepted.set_recipients(packed);
    let restored = AcceptedBatch::restore(
        Arc::clone(&fixture.app),
        "key".into(),
        batch.batch_id.as_str().into(),
        batch.campaign_id.as_str().into(),
        batch.template.clone(),
        ctx,
        batch.template.ttl,
        batch.campaign_rate_per_minute,
        started(),
        Box::from(accepted.packed_recipients()),
        Arc::clone(&fixture.hub),
    )
    .unwrap_or_else(|e| panic!("a template that compiled once fails to compile again: {e:?}"));
    for (at, message_id, first, r) in sent {
        let index = u32::try_from(at.index()).unwrap_or(u32::MAX);
        let (meta, again) = restored.job_at(at.offset(), index, 0);
        assert_eq!(meta.message_id, message_id);
        assert_eq!(meta.platform, r.platform);
        assert_eq!(meta.user_id, r.user_id);
        assert_eq!(meta.accepted_at, started());
        assert_eq!(
            meta.expires_at,
            batch.template.ttl.map(|ttl| started() + ttl)
        );
        let again = again.unwrap_or_else(|e| {
            panic!("validated at ingest, but the packed recipient fails to render: {e:?}")
        });
        same_request(&first, &again);
    }
}

/// A rendered request as a provider takes it. APNs: the payload is a JSON object with an `aps`
/// object, within the push type's size limit; the priority is 10, 5 or 1 (5 for background,
/// whose `aps` is exactly `{"content-available":1}`); the topic is the app's plus the push
/// type's suffix; the collapse id fits `apns-collapse-id`. FCM: `{"message":{...}}` addressed
/// to the recipient's token (an override cannot retarget it), within FCM's size limit without
/// the token, with string-only `data` maps and `apns.headers`.
fn check_request(request: &ProviderRequest, recipient: &Recipient, template: &Template) {
    match request {
        ProviderRequest::Apns(a) => {
            assert_eq!(a.device_token, recipient.device_token);
            assert!(
                a.payload.len() <= a.push_type.max_payload_bytes(),
                "APNs payload of {} bytes over the {:?} limit",
                a.payload.len(),
                a.push_type
            );
            let payload: serde_json::Value = serde_json::from_slice(&a.payload)
                .unwrap_or_else(|e| panic!("APNs payload is not JSON ({e}): {:?}", a.payload));
            let aps = payload
                .get("aps")
                .and_then(serde_json::Value::as_object)
                .unwrap_or_else(|| panic!("APNs payload without an aps object: {payload}"));
            assert!(matches!(a.priority, 10 | 5 | 1), "priority {}", a.priority);
            if a.push_type == PushType::Background {
                assert_eq!(a.priority, 5);
                assert_eq!(
                    serde_json::Value::Object(aps.clone()),
                    serde_json::json!({"content-available": 1})
                );
            }
            let topic = String::from_utf8_lossy(&a.topic);
            assert_eq!(topic, format!("{TOPIC}{}", a.push_type.topic_suffix()));
            if let Some(id) = &a.collapse_id {
                assert!(!id.is_empty() && id.len() <= MAX_COLLAPSE_KEY_BYTES);
            }
            if let Some(expiration) = a.expiration {
                let ttl = template.ttl.map_or(0, |t| t.as_secs());
                assert!(
                    expiration == 0 || (1_800_000_000..=1_800_000_000 + ttl).contains(&expiration),
                    "apns-expiration {expiration}"
                );
            }
        }
        ProviderRequest::Fcm(f) => {
            assert_eq!(f.device_token, recipient.device_token);
            let size = f.body.len().saturating_sub(f.device_token.len());
            assert!(size <= MAX_FCM_PAYLOAD_BYTES, "FCM message of {size} bytes");
            let body: serde_json::Value = serde_json::from_slice(&f.body)
                .unwrap_or_else(|e| panic!("FCM body is not JSON ({e}): {:?}", f.body));
            let message = body
                .get("message")
                .and_then(serde_json::Value::as_object)
                .unwrap_or_else(|| panic!("FCM body without a message object: {body}"));
            assert_eq!(
                message.get("token").and_then(serde_json::Value::as_str),
                Some(recipient.device_token.as_str()),
                "the message is not addressed to the recipient's token"
            );
            for target in ["topic", "condition", "fid"] {
                assert!(!message.contains_key(target), "{target} set: {body}");
            }
            let strings_only = |v: Option<&serde_json::Value>, what: &str| {
                if let Some(v) = v {
                    let map = v
                        .as_object()
                        .unwrap_or_else(|| panic!("{what} is not an object: {body}"));
                    assert!(
                        map.values().all(serde_json::Value::is_string),
                        "{what} holds a non-string: {body}"
                    );
                }
            };
            strings_only(message.get("data"), "data");
            let android = message.get("android");
            strings_only(android.and_then(|a| a.get("data")), "android.data");
            let apns = message.get("apns");
            strings_only(apns.and_then(|a| a.get("headers")), "apns.headers");
        }
    }
}

/// Two renderings of one message: equal in everything sent (a non-UUID message id gets a random
/// `apns-id` each time, so that is compared only for a UUID).
fn same_request(first: &ProviderRequest, again: &ProviderRequest) {
    match (first, again) {
        (ProviderRequest::Apns(a), ProviderRequest::Apns(b)) => {
            assert_eq!(a.device_token, b.device_token);
            assert_eq!(a.topic, b.topic);
            assert_eq!(a.push_type, b.push_type);
            assert_eq!(a.priority, b.priority);
            assert_eq!(a.expiration, b.expiration);
            assert_eq!(a.collapse_id, b.collapse_id);
            assert_eq!(
                a.payload, b.payload,
                "the restored message renders another payload"
            );
        }
        (ProviderRequest::Fcm(a), ProviderRequest::Fcm(b)) => {
            assert_eq!(a.device_token, b.device_token);
            assert_eq!(a.body, b.body, "the restored message renders another body");
        }
        _ => panic!("the restored message is for the other provider"),
    }
}

/// The packed codec: a recipient read from the render target's fields packs and reads back
/// field for field (after another recipient, so offsets other than 0 are used), and the input's
/// raw bytes read as a packed recipient (a damaged copy in a durable store) never panic, nor
/// does restoring and rendering them.
pub fn packed(data: &[u8]) {
    let f = Fields::parse(data);
    let batch = batch_of(&f);
    if let Ok(template) = CompiledTemplate::compile(&batch.template) {
        let content = u16::from(data.first().copied().unwrap_or(0) & 3);
        let [first, second] = [&batch.recipients[0], &batch.recipients[1]];
        crate::work::fuzz::round_trip(
            std::slice::from_ref(first),
            second,
            &second.message_id,
            content,
            &template,
        );
        crate::work::fuzz::round_trip(&[], first, &first.message_id, 0, &template);
        crate::work::fuzz::unpack_anything(data, &template, &["first_name", "a", "user"]);
    }
    let template = Template {
        title: "{{ a }} {{ user.name | default: b }}".into(),
        body: "{% for x in items %}{{ x }}{% endfor %}".into(),
        ..Template::default()
    };
    let fixture = &*FIXTURE;
    let Ok(restored) = AcceptedBatch::restore(
        Arc::clone(&fixture.app),
        "key".into(),
        "b".into(),
        "c".into(),
        template,
        RenderContext::default(),
        Some(Duration::from_secs(60)),
        0,
        started(),
        Box::from(data),
        Arc::clone(&fixture.hub),
    ) else {
        panic!("the fixed template compiles");
    };
    for at in [
        0,
        1,
        7,
        u32::try_from(data.len()).unwrap_or(u32::MAX),
        u32::MAX,
    ] {
        let _ = restored.job_at(at, 0, u32::MAX);
    }
}
