//! Audience files for `pushgate send`: CSV with a header row, or NDJSON (one object per line),
//! read one record at a time into recipients. Columns `token` (or `device_token`), `platform`,
//! `user_id`, `locale`, `timezone`, `message_id`, `title`, `body`, `apns_json` and `fcm_json`
//! are the recipient's fields; every other column is a template variable.

use std::collections::BTreeMap;
use std::io::BufRead;

use crate::proto;

/// One record of the audience file.
#[derive(Debug, Clone, PartialEq)]
// Records are read and sent one at a time, so the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Record {
    /// A recipient, at `line` (CSV: the data row's number from 1; NDJSON: the line number).
    Recipient {
        line: u64,
        recipient: proto::Recipient,
    },
    /// A record that cannot be sent, with the column at fault.
    Invalid {
        line: u64,
        field: String,
        reason: String,
    },
    /// Nothing to send (a blank NDJSON line); counted so resuming can move past it.
    Blank { line: u64 },
}

impl Record {
    pub fn line(&self) -> u64 {
        match self {
            Record::Recipient { line, .. }
            | Record::Invalid { line, .. }
            | Record::Blank { line } => *line,
        }
    }
}

/// Builds a recipient from `(column, value)` pairs; `message_id` is used when the file has no
/// `message_id` of its own.
pub fn recipient_from<'a>(
    pairs: impl IntoIterator<Item = (&'a str, String)>,
    message_id: String,
) -> Result<proto::Recipient, (String, String)> {
    let mut r = proto::Recipient {
        message_id,
        ..Default::default()
    };
    let mut platform = None;
    for (column, value) in pairs {
        let column = column.trim();
        match column.to_ascii_lowercase().as_str() {
            "token" | "device_token" => r.device_token = value.trim().to_string(),
            "platform" => platform = Some(value),
            "user_id" => r.user_id = value,
            "locale" => r.locale = value,
            "timezone" => r.timezone = value,
            "message_id" if !value.is_empty() => r.message_id = value,
            "message_id" => {}
            "title" if !value.is_empty() => r.title = Some(value),
            "body" if !value.is_empty() => r.body = Some(value),
            "title" | "body" => {}
            "apns_json" => r.apns_json = value,
            "fcm_json" => r.fcm_json = value,
            // Empty cells leave the variable out, so a template default applies.
            _ if value.is_empty() => {}
            _ => {
                r.vars.insert(column.to_string(), value);
            }
        }
    }
    r.platform = match platform.as_deref().map(|p| p.trim().to_ascii_lowercase()) {
        Some(p) if matches!(p.as_str(), "apns" | "ios" | "apple") => proto::Platform::Apns as i32,
        Some(p) if matches!(p.as_str(), "fcm" | "android" | "firebase") => {
            proto::Platform::Fcm as i32
        }
        Some(_) => {
            return Err((
                "platform".into(),
                "must be apns (ios) or fcm (android)".into(),
            ));
        }
        None => return Err(("platform".into(), "missing".into())),
    };
    if r.device_token.is_empty() {
        return Err(("token".into(), "missing".into()));
    }
    Ok(r)
}

/// The file formats of audiences and receipts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Csv,
    Ndjson,
}

impl Format {
    /// By extension: `.ndjson`, `.jsonl` and `.json` are NDJSON, anything else CSV.
    pub fn of_path(path: &std::path::Path) -> Format {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
        {
            Some(e) if matches!(e.as_str(), "ndjson" | "jsonl" | "json") => Format::Ndjson,
            _ => Format::Csv,
        }
    }
}

/// Reads `input` record by record, calling `each` until it returns `false`. `message_id`
/// gives the id of a record without one, from its line.
pub fn read(
    input: impl std::io::Read,
    format: Format,
    message_id: &dyn Fn(u64) -> String,
    each: &mut dyn FnMut(Record) -> bool,
) -> Result<(), String> {
    match format {
        Format::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .flexible(true)
                .trim(csv::Trim::Headers)
                .from_reader(input);
            let headers = reader
                .headers()
                .map_err(|e| format!("reading the CSV header: {e}"))?
                .clone();
            let mut line = 0u64;
            for record in reader.records() {
                line += 1;
                let record = match record {
                    Ok(record) => record,
                    Err(e) => {
                        let invalid = Record::Invalid {
                            line,
                            field: String::new(),
                            reason: format!("unreadable CSV record: {e}"),
                        };
                        if !each(invalid) {
                            return Ok(());
                        }
                        continue;
                    }
                };
                let item = if record.len() != headers.len() {
                    Record::Invalid {
                        line,
                        field: String::new(),
                        reason: format!(
                            "{} columns where the header has {}",
                            record.len(),
                            headers.len()
                        ),
                    }
                } else {
                    let pairs = headers.iter().zip(record.iter().map(str::to_string));
                    match recipient_from(pairs, message_id(line)) {
                        Ok(recipient) => Record::Recipient { line, recipient },
                        Err((field, reason)) => Record::Invalid {
                            line,
                            field,
                            reason,
                        },
                    }
                };
                if !each(item) {
                    return Ok(());
                }
            }
            Ok(())
        }
        Format::Ndjson => {
            let reader = std::io::BufReader::new(input);
            for (index, text) in reader.lines().enumerate() {
                let line = index as u64 + 1;
                let text = text.map_err(|e| format!("reading line {line}: {e}"))?;
                let item = if text.trim().is_empty() {
                    Record::Blank { line }
                } else {
                    match ndjson_recipient(&text, message_id(line)) {
                        Ok(recipient) => Record::Recipient { line, recipient },
                        Err((field, reason)) => Record::Invalid {
                            line,
                            field,
                            reason,
                        },
                    }
                };
                if !each(item) {
                    return Ok(());
                }
            }
            Ok(())
        }
    }
}

/// One NDJSON object: the recipient's fields by name, `vars` as an object, and any other key a
/// variable (numbers and booleans written as text).
fn ndjson_recipient(text: &str, message_id: String) -> Result<proto::Recipient, (String, String)> {
    let object: BTreeMap<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| (String::new(), format!("not a JSON object: {e}")))?;
    let mut pairs = Vec::with_capacity(object.len());
    let as_text = |key: &str, value: &serde_json::Value| -> Result<String, (String, String)> {
        match value {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Null => Ok(String::new()),
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => Ok(value.to_string()),
            _ => Err((
                key.to_string(),
                "must be text, a number or a boolean".into(),
            )),
        }
    };
    for (key, value) in &object {
        if key == "vars" {
            let serde_json::Value::Object(vars) = value else {
                return Err(("vars".into(), "must be an object".into()));
            };
            for (name, v) in vars {
                pairs.push((name.as_str(), as_text(&format!("vars.{name}"), v)?));
            }
        } else {
            pairs.push((key.as_str(), as_text(key, value)?));
        }
    }
    recipient_from(pairs, message_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &str, format: Format) -> Vec<Record> {
        let mut out = Vec::new();
        read(
            input.as_bytes(),
            format,
            &|line| format!("run-{line}"),
            &mut |r| {
                out.push(r);
                true
            },
        )
        .unwrap();
        out
    }

    #[test]
    fn csv_columns_become_fields_and_vars() {
        let records = all(
            "token,platform,user_id,first_name,city,locale\n\
             abc,ios,u1,Ann,,fr-FR\n\
             def,Android,u2,\"Bob, Jr.\",Paris,\n\
             ghi,pigeon,u3,C,D,\n\
             ,fcm,u4,,,\n\
             short,fcm\n",
            Format::Csv,
        );
        assert_eq!(records.len(), 5);
        let Record::Recipient { line: 1, recipient } = &records[0] else {
            panic!("{:?}", records[0]);
        };
        assert_eq!(recipient.platform, proto::Platform::Apns as i32);
        assert_eq!(recipient.message_id, "run-1");
        assert_eq!(recipient.locale, "fr-FR");
        assert_eq!(
            recipient.vars.get("first_name").map(String::as_str),
            Some("Ann")
        );
        assert!(
            !recipient.vars.contains_key("city"),
            "empty cells are left out"
        );
        let Record::Recipient { recipient, .. } = &records[1] else {
            panic!();
        };
        assert_eq!(recipient.vars["first_name"], "Bob, Jr.");
        assert_eq!(recipient.platform, proto::Platform::Fcm as i32);
        assert!(
            matches!(&records[2], Record::Invalid { line: 3, field, .. } if field == "platform")
        );
        assert!(matches!(&records[3], Record::Invalid { line: 4, field, .. } if field == "token"));
        assert!(matches!(&records[4], Record::Invalid { line: 5, .. }));
    }

    #[test]
    fn ndjson_objects_with_vars_and_blank_lines() {
        let records = all(
            "{\"device_token\":\"abc\",\"platform\":\"apns\",\"vars\":{\"n\":3},\"plan\":\"pro\",\"message_id\":\"mine\"}\n\
             \n\
             not json\n\
             {\"token\":\"x\",\"platform\":\"fcm\",\"vars\":[1]}\n",
            Format::Ndjson,
        );
        let Record::Recipient { line: 1, recipient } = &records[0] else {
            panic!("{:?}", records[0]);
        };
        assert_eq!(recipient.message_id, "mine");
        assert_eq!(recipient.vars["n"], "3");
        assert_eq!(recipient.vars["plan"], "pro");
        assert_eq!(records[1], Record::Blank { line: 2 });
        assert!(matches!(&records[2], Record::Invalid { line: 3, .. }));
        assert!(matches!(&records[3], Record::Invalid { line: 4, field, .. } if field == "vars"));
    }

    proptest::proptest! {
        /// Whatever the bytes, reading never panics, and every record carries a line that
        /// grows through the file.
        #[test]
        fn any_input_reads_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), csv in proptest::prelude::any::<bool>()) {
            let format = if csv { Format::Csv } else { Format::Ndjson };
            let mut last = 0;
            let _ = read(&bytes[..], format, &|line| format!("r-{line}"), &mut |record| {
                assert!(record.line() > last);
                last = record.line();
                true
            });
        }
    }
}
