//! The bodies of the fuzz targets, in one place for two callers: the cargo-fuzz crate in `fuzz/`
//! (libFuzzer, nightly; `scripts/fuzz.sh`), and the stable unit tests below, which replay every
//! committed seed (`fuzz/corpus/<target>/`) and every past finding
//! (`fuzz/regressions/<target>/`) through the same body on every `cargo test`.
//!
//! Why a module of the gateway crate rather than a crate of its own: the bodies reach items the
//! gateway keeps crate-private (the packed codec, the ingest checks in the order ingest runs
//! them), and a separate crate would force those public. The module is compiled only for the
//! unit tests and with the `fuzzing` feature (which only the fuzz crate enables), so the shipped
//! binary does not carry it.
//!
//! Each body asserts the properties its code promises, not only that it does not panic:
//!
//! | target          | input                                   | asserts                                   |
//! |-----------------|-----------------------------------------|-------------------------------------------|
//! | `request`       | protobuf `SendBatchRequest` bytes       | [`request`]                               |
//! | `render`        | NUL-separated template and recipient    | [`render`]                                |
//! | `template`      | Liquid source, then `name=value` fields | [`template`]                              |
//! | `packed`        | NUL-separated recipient / raw bytes     | [`packed`]                                |
//! | `apns_response` | `status\nbody`                          | [`provider::apns_response`]               |
//! | `fcm_response`  | `status\nretry-after\nbody`             | [`provider::fcm_response`]                |
//! | `retry_after`   | a `Retry-After` header value            | [`provider::retry_after`]                 |

mod batch;
pub mod provider;
#[cfg(test)]
mod seeds;

use std::collections::BTreeMap;

pub use batch::{packed, render, request};

use crate::render::template::{MAX_OUTPUT_BYTES, Text};

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target: its name (the directory of its corpus and regressions) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("request", request),
    ("render", render),
    ("template", template),
    ("packed", packed),
    ("apns_response", provider::apns_response),
    ("fcm_response", provider::fcm_response),
    ("retry_after", provider::retry_after),
];

/// A fuzz input read as NUL-separated text fields (invalid UTF-8 replaced); a missing field is
/// empty. Text inputs keep the seeds readable and let libFuzzer's dictionary-free mutations
/// reach every field.
pub(crate) struct Fields(Vec<String>);

impl Fields {
    pub(crate) fn parse(data: &[u8]) -> Self {
        Fields(
            data.split(|&b| b == 0)
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect(),
        )
    }

    pub(crate) fn get(&self, i: usize) -> &str {
        self.0.get(i).map_or("", String::as_str)
    }

    /// Fields `from..` as `name=value` pairs (a field without `=` is a name with an empty value).
    pub(crate) fn pairs_from(&self, from: usize) -> BTreeMap<String, String> {
        self.0.iter().skip(from).map(|f| pair(f)).collect()
    }
}

fn pair(field: &str) -> (String, String) {
    match field.split_once('=') {
        Some((k, v)) => (k.to_owned(), v.to_owned()),
        None => (field.to_owned(), String::new()),
    }
}

/// `name=value` lines.
pub(crate) fn lines(text: &str) -> BTreeMap<String, String> {
    text.lines().filter(|l| !l.is_empty()).map(pair).collect()
}

/// The Liquid engine: parsing never panics and names a position; a render is deterministic,
/// within [`MAX_OUTPUT_BYTES`], at least the text's literal length, and depends only on the
/// variables [`Text::variables`] names (what a waiting message keeps of its recipient's
/// variables); a static text renders without variables as with them.
pub fn template(data: &[u8]) {
    let fields = Fields::parse(data);
    let source = fields.get(0);
    let vars = fields.pairs_from(1);
    let text = match Text::parse(source) {
        Ok(text) => text,
        Err(e) => {
            assert!(e.line >= 1 && e.column >= 1, "{e:?}");
            return;
        }
    };
    assert_eq!(text.source(), source);
    let first = text.render(&vars);
    assert_eq!(text.render(&vars), first, "a render is deterministic");
    if let Ok(out) = &first {
        assert!(out.len() <= MAX_OUTPUT_BYTES, "{} bytes", out.len());
        assert!(
            out.len() >= text.literal_len(),
            "rendered {} bytes, under the literal length {}",
            out.len(),
            text.literal_len()
        );
    }
    let used: BTreeMap<String, String> = vars
        .iter()
        .filter(|(name, _)| text.variables().any(|v| v == name.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        text.render(&used),
        first,
        "the render read a variable that Text::variables does not name"
    );
    if text.is_static() {
        assert_eq!(text.render(&BTreeMap::new()), first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn dir(kind: &str, target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(kind)
            .join(target)
    }

    /// Runs every file of `fuzz/<kind>/<target>/` through the target's body; returns how many.
    fn replay(kind: &str, target: &str) -> usize {
        let body = TARGETS
            .iter()
            .find(|(name, _)| *name == target)
            .map(|(_, body)| *body)
            .unwrap_or_else(|| panic!("no target {target}"));
        let Ok(entries) = std::fs::read_dir(dir(kind, target)) else {
            return 0;
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for file in &files {
            let data = std::fs::read(file).unwrap();
            let result = std::panic::catch_unwind(|| body(&data));
            assert!(result.is_ok(), "{target}: {} fails", file.display());
        }
        files.len()
    }

    macro_rules! replay_tests {
        ($($name:ident => $target:literal),* $(,)?) => {$(
            /// Replays the target's committed seeds and regression inputs.
            #[test]
            fn $name() {
                let seeds = replay("corpus", $target);
                assert!(seeds > 0, "no seeds committed for {}", $target);
                replay("regressions", $target);
            }
        )*};
    }

    replay_tests! {
        replay_request => "request",
        replay_render => "render",
        replay_template => "template",
        replay_packed => "packed",
        replay_apns_response => "apns_response",
        replay_fcm_response => "fcm_response",
        replay_retry_after => "retry_after",
    }

    #[test]
    fn every_target_has_a_replay_test_and_a_fuzz_binary() {
        let fuzz_toml = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"),
        )
        .unwrap();
        for (name, _) in TARGETS {
            assert!(
                fuzz_toml.contains(&format!("name = \"{name}\"")),
                "fuzz/Cargo.toml has no [[bin]] {name}"
            );
            assert!(dir("corpus", name).is_dir(), "no fuzz/corpus/{name}");
        }
    }
}
