//! Generated protobuf and gRPC code for `pushgate.v1`, compiled once from `pushgate/v1/` and used
//! by the gateway (server), the load tool and the tests (clients). Every message also has serde
//! impls in the proto3 JSON mapping (pbjson), used by the HTTP/JSON API.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("pushgate.v1");
include!(concat!(env!("OUT_DIR"), "/pushgate.v1.serde.rs"));

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pushgate_descriptor.bin"));

/// `Debug` of personal data: length and last four characters, never the value.
struct Redacted<'a>(&'a str);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.0.chars().count();
        match len {
            0 => f.write_str("<empty>"),
            1..=8 => write!(f, "<redacted {len} chars>"),
            _ => {
                let tail: String = self.0.chars().skip(len - 4).collect();
                write!(f, "…{tail}({len})")
            }
        }
    }
}

/// `Debug` of a text that may hold personal data: its length only.
struct Len<'a>(&'a str);

impl std::fmt::Debug for Len<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.len() {
            0 => f.write_str("<empty>"),
            n => write!(f, "<{n} bytes>"),
        }
    }
}

/// Device token and user id as fingerprints, variables by name, texts and JSON by length.
impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipient")
            .field("message_id", &self.message_id)
            .field("platform", &self.platform)
            .field("device_token", &Redacted(&self.device_token))
            .field("vars", &self.vars.keys().collect::<Vec<_>>())
            .field("user_id", &Redacted(&self.user_id))
            .field("locale", &self.locale)
            .field("timezone", &self.timezone)
            .field("apns_json", &Len(&self.apns_json))
            .field("fcm_json", &Len(&self.fcm_json))
            .field("title", &self.title.as_deref().map(Len))
            .field("body", &self.body.as_deref().map(Len))
            .field("token_registered_at_ms", &self.token_registered_at_ms)
            .field("send_at_ms", &self.send_at_ms)
            .finish()
    }
}

/// Texts, URLs and raw JSON by length, `data` by key: a template can carry personal data.
impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("title", &Len(&self.title))
            .field("subtitle", &Len(&self.subtitle))
            .field("body", &Len(&self.body))
            .field("image_url", &Len(&self.image_url))
            .field("deep_link", &Len(&self.deep_link))
            .field("sound", &self.sound)
            .field("badge", &self.badge)
            .field("category", &self.category)
            .field("thread_id", &Len(&self.thread_id))
            .field("data", &self.data.keys().collect::<Vec<_>>())
            .field("collapse_key", &Len(&self.collapse_key))
            .field("ttl_seconds", &self.ttl_seconds)
            .field("priority", &self.priority)
            .field("push_type", &self.push_type)
            .field("content_available", &self.content_available)
            .field("mutable_content", &self.mutable_content)
            .field("apns_json", &Len(&self.apns_json))
            .field("fcm_json", &Len(&self.fcm_json))
            .field("android_channel_id", &self.android_channel_id)
            .field("locales", &self.locales)
            .field("experiment", &self.experiment)
            .finish()
    }
}

impl std::fmt::Debug for LocalizedText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalizedText")
            .field("title", &Len(&self.title))
            .field("subtitle", &Len(&self.subtitle))
            .field("body", &Len(&self.body))
            .finish()
    }
}

impl std::fmt::Debug for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Variant")
            .field("name", &self.name)
            .field("weight", &self.weight)
            .field("title", &Len(&self.title))
            .field("subtitle", &Len(&self.subtitle))
            .field("body", &Len(&self.body))
            .field("locales", &self.locales)
            .finish()
    }
}

/// `Debug` for a message whose fields are shown as they are except for the ones named after
/// `redacted`, which carry a device token or a user id and are shown as fingerprints.
macro_rules! debug_redacting {
    ($message:ident { $($plain:ident),* ; redacted: $($secret:ident),+ }) => {
        impl std::fmt::Debug for $message {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut out = f.debug_struct(stringify!($message));
                $(out.field(stringify!($plain), &self.$plain);)*
                $(out.field(stringify!($secret), &Redacted(&self.$secret));)+
                out.finish()
            }
        }
    };
}

debug_redacting!(Receipt {
    app_id, batch_id, campaign_id, message_id, platform, status, terminal, reason,
    provider_status, provider_message_id, attempt, accepted_at_ms, completed_at_ms,
    next_attempt_at_ms, token_invalid_since_ms, field, cursor, variant, locale, scheduled_for_ms;
    redacted: user_id
});
debug_redacting!(DeadLetter {
    message_id, batch_id, campaign_id, platform, attempts, last_error, dead_at_ms,
    accepted_at_ms;
    redacted: user_id
});
debug_redacting!(InvalidToken {
    invalid_since_ms, cursor, reported_at_ms;
    redacted: device_token
});
debug_redacting!(OptOutRequest { app_id; redacted: user_id });
debug_redacting!(ForgetUserRequest { app_id; redacted: user_id });

impl std::fmt::Debug for TrackedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedEvent")
            .field("event_id", &self.event_id)
            .field("type", &self.r#type)
            .field("message_id", &self.message_id)
            .field("user_id", &Redacted(&self.user_id))
            .field("campaign_id", &self.campaign_id)
            .field("occurred_at_ms", &self.occurred_at_ms)
            // A zone narrows where a user is: like the user id, only as a fingerprint.
            .field("timezone", &Redacted(&self.timezone))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_debug_without_tokens_personal_data_or_texts() {
        let secret = "Ada Lovelace 424242";
        let token = "f00dfeed".repeat(8);
        let request = SendBatchRequest {
            template: Some(Template {
                title: secret.into(),
                data: [("k".to_string(), secret.to_string())].into(),
                locales: [(
                    "pt".to_string(),
                    LocalizedText {
                        body: secret.into(),
                        ..Default::default()
                    },
                )]
                .into(),
                experiment: Some(Experiment {
                    variants: vec![Variant {
                        title: secret.into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            recipients: vec![Recipient {
                device_token: token.clone(),
                user_id: "user-secret-000001".into(),
                vars: [("name".to_string(), secret.to_string())].into(),
                title: Some(secret.into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let shown = format!("{request:?}");
        for leaked in ["Ada Lovelace", &token, "user-secret-000001"] {
            assert!(!shown.contains(leaked), "{leaked} in {shown}");
        }
        assert!(
            shown.contains("…feed(64)") && shown.contains("name"),
            "{shown}"
        );
    }

    /// Every message with a hand-written `Debug` shows every field the .proto declares (a field
    /// added later must be added there too, redacted if it is personal).
    #[test]
    fn hand_written_debug_covers_every_field() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
        let outputs = [
            ("Recipient", format!("{:?}", Recipient::default())),
            ("Template", format!("{:?}", Template::default())),
            ("LocalizedText", format!("{:?}", LocalizedText::default())),
            ("Variant", format!("{:?}", Variant::default())),
            ("Receipt", format!("{:?}", Receipt::default())),
            ("DeadLetter", format!("{:?}", DeadLetter::default())),
            ("InvalidToken", format!("{:?}", InvalidToken::default())),
            ("OptOutRequest", format!("{:?}", OptOutRequest::default())),
            (
                "ForgetUserRequest",
                format!("{:?}", ForgetUserRequest::default()),
            ),
            ("TrackedEvent", format!("{:?}", TrackedEvent::default())),
        ];
        for (name, debug) in outputs {
            let message = set
                .file
                .iter()
                .flat_map(|f| &f.message_type)
                .find(|m| m.name() == name)
                .unwrap_or_else(|| panic!("{name} is not in the descriptor"));
            for field in &message.field {
                assert!(
                    debug.contains(&format!("{}: ", field.name())),
                    "{name}'s Debug omits `{}`: {debug}",
                    field.name()
                );
            }
        }
    }

    #[test]
    fn receipts_dead_letters_tokens_and_events_debug_without_tokens_or_user_ids() {
        let user = "user-4242-ada@example.com";
        let token = "f00dfeed".repeat(8);
        let outputs = [
            format!(
                "{:?}",
                Receipt {
                    user_id: user.into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                DeadLetter {
                    user_id: user.into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                InvalidToken {
                    device_token: token.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                OptOutRequest {
                    user_id: user.into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                ForgetUserRequest {
                    user_id: user.into(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                TrackedEvent {
                    user_id: user.into(),
                    ..Default::default()
                }
            ),
        ];
        for debug in outputs {
            assert!(!debug.contains(user) && !debug.contains(&token), "{debug}");
            assert!(debug.contains('…'), "the fingerprint is shown: {debug}");
        }
    }
}
