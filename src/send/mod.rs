//! `pushgate send`: streams an audience file (CSV or NDJSON, `audience`) through `StreamSend`
//! with a template file, shows a live progress bar, and writes one receipt per record to a CSV or
//! NDJSON file. A client of the gateway's public API; it knows nothing of the gateway's insides.
//!
//! **Resuming.** Every record's message id is stable (`<run id>-<line>`, the run id derived from
//! the app, the campaign and the audience file's path), and a state file next to the output
//! (`<out>.state`) records how much of the output is complete and the line up to which every
//! record has its receipt. Run the same command again after an interruption: the output is cut
//! back to its last complete row, records that have a receipt are skipped, and the rest is sent
//! again with the same ids, so a gateway with Redis (idempotency window) sends none of them twice.
//! Ctrl-C (or SIGTERM) stops reading the file and waits for the receipts of what was sent, so
//! even without Redis nothing is sent twice; a second Ctrl-C stops at once.

pub mod audience;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::proto;
pub use audience::{Format, Record};

/// The arguments of `pushgate send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The gateway's gRPC address.
    #[arg(
        long,
        env = "PUSHGATE_GATEWAY",
        default_value = "http://127.0.0.1:50051"
    )]
    pub gateway: String,
    /// Extra CA certificate (PEM) to trust for an `https://` gateway (a private CA); the web
    /// PKI roots are trusted too.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (one PEM file with both, or see `--client-key`) for a gateway
    /// that requires mutual TLS.
    #[arg(long)]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM), when not in `--client-cert`.
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// API key of the app (`authorization: Bearer`).
    #[arg(long, env = "PUSHGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The app to send for.
    #[arg(long)]
    pub app: String,
    /// Campaign id of every batch.
    #[arg(long, default_value = "")]
    pub campaign_id: String,
    /// Campaign rate limit, messages per minute (0: none).
    #[arg(long, default_value_t = 0)]
    pub campaign_rate_per_minute: u32,
    /// The template: a TOML or JSON (`.json`) file with the fields of `pushgate.v1.Template`.
    #[arg(long)]
    pub template: PathBuf,
    /// The audience: CSV with a header row, or NDJSON (`.ndjson`, `.jsonl`, `.json`).
    #[arg(long)]
    pub audience: PathBuf,
    /// Overrides the audience format the extension implies.
    #[arg(long, value_enum)]
    pub audience_format: Option<Format>,
    /// Where the receipts go: CSV, or NDJSON by extension (`.ndjson`, `.jsonl`, `.json`).
    #[arg(long)]
    pub out: PathBuf,
    /// Overrides the output format the extension implies.
    #[arg(long, value_enum)]
    pub out_format: Option<Format>,
    /// The resume state file (default: `<out>.state`).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Prefix of the generated message ids (default: derived from app, campaign and audience
    /// path, so a rerun of the same command uses the same ids).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Recipients per batch.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Recipients sent and still waiting for their receipt, at most.
    #[arg(long, default_value_t = 20_000)]
    pub max_in_flight: usize,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records skipped because an earlier run wrote their receipt.
    pub skipped: u64,
    pub sent: u64,
    pub accepted: u64,
    pub delivered: u64,
    pub failed: u64,
    /// True when every record of the file has its receipt.
    pub complete: bool,
}

/// The resume state (`<out>.state`), replaced atomically at every checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    run_id: String,
    audience: String,
    /// Bytes of the output that hold complete rows.
    out_bytes: u64,
    /// Every record up to this line has its receipt in the output.
    done_through: u64,
    complete: bool,
}

const CSV_HEADER: &[&str] = &[
    "line",
    "message_id",
    "user_id",
    "platform",
    "token",
    "status",
    "reason",
    "field",
    "provider_status",
    "provider_message_id",
    "attempt",
    "completed_at_ms",
];

/// What is kept of a sent record until its receipt arrives.
struct Sent {
    line: u64,
    recipient: proto::Recipient,
}

/// One output row.
#[derive(Serialize)]
struct Row<'a> {
    line: u64,
    message_id: &'a str,
    user_id: &'a str,
    platform: &'a str,
    token: &'a str,
    status: &'a str,
    reason: &'a str,
    field: &'a str,
    provider_status: u32,
    provider_message_id: &'a str,
    attempt: u32,
    completed_at_ms: i64,
}

/// The output file and the resume bookkeeping.
struct Output {
    writer: BufWriter<std::fs::File>,
    format: Format,
    /// Bytes written so far (complete rows only: rows are written whole).
    bytes: u64,
    state_path: PathBuf,
    state: State,
    /// Lines done above `state.done_through`.
    done_above: BTreeSet<u64>,
}

impl Output {
    fn write(&mut self, row: &Row<'_>) -> anyhow::Result<()> {
        let mut buf = Vec::with_capacity(256);
        match self.format {
            Format::Ndjson => {
                serde_json::to_writer(&mut buf, row)?;
                buf.push(b'\n');
            }
            Format::Csv => {
                let mut w = csv::WriterBuilder::new()
                    .has_headers(false)
                    .from_writer(&mut buf);
                w.serialize(row)?;
                w.flush()?;
            }
        }
        self.writer.write_all(&buf)?;
        self.bytes += buf.len() as u64;
        self.done(row.line);
        Ok(())
    }

    fn done(&mut self, line: u64) {
        if line > self.state.done_through {
            self.done_above.insert(line);
        }
        while self.done_above.remove(&(self.state.done_through + 1)) {
            self.state.done_through += 1;
        }
    }

    /// Flushes the rows and replaces the state file (write, then rename: never half written).
    fn checkpoint(&mut self, complete: bool) -> anyhow::Result<()> {
        self.writer.flush()?;
        self.state.out_bytes = self.bytes;
        self.state.complete = complete;
        let tmp = self.state_path.with_extension("state.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.state_path)
            .with_context(|| format!("replacing {}", self.state_path.display()))?;
        Ok(())
    }
}

/// The message-id prefix of a run: the same app, campaign and audience file give the same one.
fn derived_run_id(app: &str, campaign: &str, audience: &Path) -> String {
    let path = std::fs::canonicalize(audience).unwrap_or_else(|_| audience.to_path_buf());
    let digest = Sha256::digest(format!("{app}\0{campaign}\0{}", path.display()).as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a template file: JSON (`.json`) or TOML, the fields of `pushgate.v1.Template` in the
/// proto3 JSON mapping (`ttl_seconds = 3600`, `priority = "HIGH"`, `[data]`).
pub fn load_template(path: &Path) -> anyhow::Result<proto::Template> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = if Format::of_path(path) == Format::Ndjson {
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("{}: not TOML", path.display()))?
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        anyhow::anyhow!(
            "{}: template field `{}`: {}",
            path.display(),
            e.path(),
            e.inner()
        )
    })
}

/// Opens the output for this run: fresh, or resumed from the state file.
fn open_output(
    args: &SendArgs,
    run_id: &str,
    format: Format,
) -> anyhow::Result<(Output, HashSet<u64>)> {
    let state_path = args.state.clone().unwrap_or_else(|| {
        let mut name = args.out.as_os_str().to_owned();
        name.push(".state");
        PathBuf::from(name)
    });
    let audience = args.audience.display().to_string();
    let previous: Option<State> = match std::fs::read(&state_path) {
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not a state file", state_path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context(format!("reading {}", state_path.display())),
    };
    let mut done = HashSet::new();
    let (file, bytes, state) = match previous {
        Some(state) => {
            if state.run_id != run_id {
                bail!(
                    "{} belongs to another run (run id {}, this one {run_id}): pass --run-id {} \
                     to resume it, or choose another --out",
                    state_path.display(),
                    state.run_id,
                    state.run_id
                );
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&args.out)
                .with_context(|| format!("opening {} to resume", args.out.display()))?;
            if file.metadata()?.len() < state.out_bytes {
                bail!(
                    "{} is shorter than its state file says: it was changed since",
                    args.out.display()
                );
            }
            // Rows after the last checkpoint may be cut short: drop them, they are resent.
            file.set_len(state.out_bytes)?;
            read_done_lines(&args.out, format, &mut done)?;
            let file = std::fs::OpenOptions::new().append(true).open(&args.out)?;
            (file, state.out_bytes, state)
        }
        None => {
            if std::fs::metadata(&args.out).is_ok_and(|m| m.len() > 0) {
                bail!(
                    "{} exists and has no state file ({}): remove it or choose another --out",
                    args.out.display(),
                    state_path.display()
                );
            }
            let mut file = std::fs::File::create(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?;
            let mut header = Vec::new();
            if format == Format::Csv {
                header.extend_from_slice(CSV_HEADER.join(",").as_bytes());
                header.push(b'\n');
                file.write_all(&header)?;
            }
            let state = State {
                run_id: run_id.to_string(),
                audience,
                ..Default::default()
            };
            (file, header.len() as u64, state)
        }
    };
    let mut output = Output {
        writer: BufWriter::with_capacity(1 << 16, file),
        format,
        bytes,
        state_path,
        state,
        done_above: BTreeSet::new(),
    };
    for line in &done {
        output.done(*line);
    }
    Ok((output, done))
}

/// The `line` of every row already in the output.
fn read_done_lines(out: &Path, format: Format, done: &mut HashSet<u64>) -> anyhow::Result<()> {
    let file = std::fs::File::open(out)?;
    match format {
        Format::Csv => {
            let mut reader = csv::Reader::from_reader(file);
            for record in reader.records() {
                if let Some(line) = record?.get(0).and_then(|l| l.parse().ok()) {
                    done.insert(line);
                }
            }
        }
        Format::Ndjson => {
            for text in std::io::BufReader::new(file).lines() {
                let value: serde_json::Value = serde_json::from_str(&text?)?;
                if let Some(line) = value["line"].as_u64() {
                    done.insert(line);
                }
            }
        }
    }
    Ok(())
}

fn platform_name(platform: i32) -> &'static str {
    proto::Platform::try_from(platform)
        .map(|p| p.as_str_name())
        .unwrap_or("")
}

/// What the reader thread hands over.
enum Input {
    Record(Box<Record>),
    /// The file is read to the end.
    End,
    Error(String),
}

/// Runs `pushgate send` until every record has its receipt, or an interruption.
pub async fn run(args: SendArgs) -> anyhow::Result<Summary> {
    let template = load_template(&args.template)?;
    let audience_format = args
        .audience_format
        .unwrap_or_else(|| Format::of_path(&args.audience));
    let out_format = args
        .out_format
        .unwrap_or_else(|| Format::of_path(&args.out));
    if args.batch_size == 0 || args.max_in_flight == 0 {
        bail!("--batch-size and --max-in-flight must be at least 1");
    }
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| derived_run_id(&args.app, &args.campaign_id, &args.audience));
    let input = std::fs::File::open(&args.audience)
        .with_context(|| format!("opening {}", args.audience.display()))?;
    let (mut output, done) = open_output(&args, &run_id, out_format)?;
    if output.state.complete {
        eprintln!(
            "{}: already complete (every record has its receipt in {})",
            args.audience.display(),
            args.out.display()
        );
        return Ok(Summary {
            skipped: done.len() as u64,
            complete: true,
            ..Default::default()
        });
    }
    // A state file from the start: a run that fails to connect can still be run again.
    output.checkpoint(false)?;
    let total = count_records(&args.audience, audience_format);

    let mut endpoint = tonic::transport::Endpoint::from_shared(args.gateway.clone())
        .with_context(|| format!("--gateway {}", args.gateway))?;
    if args.gateway.starts_with("https://") {
        endpoint = endpoint
            .tls_config(client_tls(&args)?)
            .context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.gateway))?;
    let bearer: Option<tonic::metadata::MetadataValue<_>> = match &args.api_key {
        Some(key) => Some(
            format!("Bearer {key}")
                .parse()
                .context("--api-key: not a valid header value")?,
        ),
        None => None,
    };
    let mut client = proto::push_gateway_client::PushGatewayClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            if let Some(bearer) = &bearer {
                request
                    .metadata_mut()
                    .insert("authorization", bearer.clone());
            }
            Ok(request)
        },
    )
    .max_decoding_message_size(64 << 20);

    // The file is read on a blocking thread, a bounded channel ahead of the sender.
    let (records_tx, mut records) = mpsc::channel::<Input>(4096);
    let skip = done.clone();
    let done_through = output.state.done_through;
    let reader_run_id = run_id.clone();
    std::thread::spawn(move || {
        let id = move |line: u64| format!("{reader_run_id}-{line}");
        let result = audience::read(input, audience_format, &id, &mut |record| {
            let line = record.line();
            if line <= done_through || skip.contains(&line) {
                return true;
            }
            records_tx
                .blocking_send(Input::Record(Box::new(record)))
                .is_ok()
        });
        let last = match result {
            Ok(()) => Input::End,
            Err(e) => Input::Error(e),
        };
        let _ = records_tx.blocking_send(last);
    });

    let (outbound, outbound_rx) = mpsc::channel::<proto::SendBatchRequest>(4);
    let mut inbound = client
        .stream_send(ReceiverStream::new(outbound_rx))
        .await
        .context("StreamSend")?
        .into_inner();

    let in_flight: Arc<Mutex<HashMap<String, Sent>>> = Arc::default();
    let window = Arc::new(Semaphore::new(args.max_in_flight));
    let stop = CancellationToken::new();
    let (local_tx, mut local) = mpsc::unbounded_channel::<Record>();
    let (resend_tx, mut resends) = mpsc::unbounded_channel::<proto::Recipient>();
    let mut summary = Summary {
        skipped: output.state.done_through + output.done_above.len() as u64,
        ..Default::default()
    };
    let sent_count = Arc::new(std::sync::atomic::AtomicU64::new(0));

    // The sender: records into batches, each recipient holding a window permit until its
    // receipt; records that cannot be sent go straight to the output as REJECTED.
    let sender = {
        let in_flight = Arc::clone(&in_flight);
        let window = Arc::clone(&window);
        let stop = stop.clone();
        let base = proto::SendBatchRequest {
            app_id: args.app.clone(),
            campaign_id: args.campaign_id.clone(),
            template: Some(template),
            campaign_rate_per_minute: args.campaign_rate_per_minute,
            ..Default::default()
        };
        let batch_size = args.batch_size;
        let sent_count = Arc::clone(&sent_count);
        tokio::spawn(async move {
            let mut batch: Vec<proto::Recipient> = Vec::with_capacity(batch_size);
            let mut file_done = false;
            let mut error = None;
            loop {
                let flush = |batch: &mut Vec<proto::Recipient>| proto::SendBatchRequest {
                    recipients: std::mem::take(batch),
                    ..base.clone()
                };
                let next = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    resend = resends.recv() => match resend {
                        Some(r) => { batch.push(r); None }
                        None => break,
                    },
                    record = records.recv(), if !file_done => Some(record),
                    // Everything read: wait for resends until nothing is in flight.
                    _ = tokio::time::sleep(Duration::from_millis(50)), if file_done => None,
                };
                match next {
                    Some(Some(Input::Record(record))) => match *record {
                        Record::Recipient { line, recipient } => {
                            // Out of window: send what is batched first, its receipts free slots.
                            if window.available_permits() == 0
                                && !batch.is_empty()
                                && outbound.send(flush(&mut batch)).await.is_err()
                            {
                                break;
                            }
                            let permit = tokio::select! {
                                permit = window.acquire() => permit,
                                _ = stop.cancelled() => break,
                            };
                            let Ok(permit) = permit else { break };
                            permit.forget();
                            sent_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let duplicate = {
                                let mut map = in_flight.lock();
                                if map.contains_key(&recipient.message_id) {
                                    true
                                } else {
                                    map.insert(
                                        recipient.message_id.clone(),
                                        Sent {
                                            line,
                                            recipient: recipient.clone(),
                                        },
                                    );
                                    false
                                }
                            };
                            if duplicate {
                                window.add_permits(1);
                                let _ = local_tx.send(Record::Invalid {
                                    line,
                                    field: "message_id".into(),
                                    reason: "duplicate message_id in the file".into(),
                                });
                            } else {
                                batch.push(recipient);
                            }
                        }
                        other => {
                            let _ = local_tx.send(other);
                        }
                    },
                    Some(Some(Input::End)) | Some(None) => file_done = true,
                    Some(Some(Input::Error(e))) => {
                        error = Some(e);
                        file_done = true;
                    }
                    None => {}
                }
                // Send a full batch, or whatever there is when no record is waiting.
                if (batch.len() >= batch_size || (!batch.is_empty() && records.is_empty()))
                    && outbound.send(flush(&mut batch)).await.is_err()
                {
                    break;
                }
                if file_done && batch.is_empty() && in_flight.lock().is_empty() {
                    break;
                }
            }
            if !batch.is_empty() {
                let _ = outbound
                    .send(proto::SendBatchRequest {
                        recipients: batch,
                        ..base.clone()
                    })
                    .await;
            }
            // Dropping `outbound` ends the request stream: the gateway then finishes what it
            // has and closes the receipt stream.
            (file_done, error)
        })
    };

    let bar = progress_bar(total, args.no_progress);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut interrupts = 0u32;
    let signal = |_: ()| crate::app::shutdown_signal();
    let mut interrupted = Box::pin(signal(()));
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(receipt)) => {
                    if let Err(e) = on_receipt(&receipt, &in_flight, &window, &resend_tx, &mut output, &mut summary) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(status) => break Err(anyhow::anyhow!("the gateway ended the stream: {status}")),
            },
            Some(record) = local.recv() => {
                if let Record::Invalid { line, field, reason } = &record {
                    output.write(&Row {
                        line: *line, message_id: "", user_id: "", platform: "", token: "",
                        status: "REJECTED", reason, field, provider_status: 0,
                        provider_message_id: "", attempt: 0, completed_at_ms: 0,
                    })?;
                    summary.failed += 1;
                } else if let Record::Blank { line } = record {
                    output.done(line);
                }
            }
            _ = tick.tick() => {
                output.checkpoint(false)?;
                summary.sent = sent_count.load(std::sync::atomic::Ordering::Relaxed);
                bar.set_position(output.state.done_through + output.done_above.len() as u64);
                bar.set_message(progress_message(&summary, started.elapsed()));
            }
            _ = &mut interrupted => {
                interrupts += 1;
                if interrupts == 1 {
                    bar.println("interrupted: no more records are sent; waiting for the receipts of those sent (again to stop now)");
                    stop.cancel();
                    interrupted = Box::pin(signal(()));
                } else {
                    break Err(anyhow::anyhow!("stopped before every receipt arrived"));
                }
            }
        }
    };
    bar.finish_and_clear();
    // Rows that went to the local channel after the stream ended.
    while let Ok(record) = local.try_recv() {
        if let Record::Invalid {
            line,
            field,
            reason,
        } = &record
        {
            output.write(&Row {
                line: *line,
                message_id: "",
                user_id: "",
                platform: "",
                token: "",
                status: "REJECTED",
                reason,
                field,
                provider_status: 0,
                provider_message_id: "",
                attempt: 0,
                completed_at_ms: 0,
            })?;
            summary.failed += 1;
        } else if let Record::Blank { line } = record {
            output.done(line);
        }
    }
    stop.cancel();
    let (file_done, read_error) = sender.await.unwrap_or((false, None));
    let outstanding = in_flight.lock().len();
    summary.complete =
        outcome.is_ok() && file_done && read_error.is_none() && outstanding == 0 && interrupts == 0;
    output.checkpoint(summary.complete)?;
    summary.sent = sent_count.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{}; receipts in {}",
        progress_message(&summary, started.elapsed()),
        args.out.display()
    );
    if let Some(e) = read_error {
        bail!("{}: {e}", args.audience.display());
    }
    outcome?;
    if !summary.complete {
        bail!(
            "{outstanding} record(s) without a receipt yet: run the same command again to resume"
        );
    }
    Ok(summary)
}

/// TLS to the gateway: the web PKI roots, `--ca-file`, and a client certificate for mutual TLS.
fn client_tls(args: &SendArgs) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read =
        |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let mut tls = ClientTlsConfig::new().with_webpki_roots();
    if let Some(ca) = &args.ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let Some(cert) = &args.client_cert {
        let cert_pem = read(cert)?;
        let key_pem = match &args.client_key {
            Some(key) => read(key)?,
            None => cert_pem.clone(),
        };
        tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
    }
    Ok(tls)
}

/// What the gateway's reason says of a message whose accept may have been applied.
const MAYBE_ACCEPTED: &str = "resend it with the same message_id to learn its outcome";

/// Handles one receipt from the gateway: a terminal one is written and frees its window slot;
/// "already accepted and still in flight" (a resend after a crash, Redis) is asked again later,
/// when the first attempt has its outcome.
fn on_receipt(
    receipt: &proto::Receipt,
    in_flight: &Mutex<HashMap<String, Sent>>,
    window: &Semaphore,
    resend: &mpsc::UnboundedSender<proto::Recipient>,
    output: &mut Output,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    if !receipt.terminal {
        // Accepted by an earlier run and still in flight, or an accept whose outcome the
        // gateway could not know (`maybe_accepted`): asked again with the same id.
        if receipt
            .reason
            .starts_with("duplicate message_id: already accepted")
            || receipt.reason.contains(MAYBE_ACCEPTED)
        {
            let again = in_flight
                .lock()
                .get(&receipt.message_id)
                .map(|s| s.recipient.clone());
            if let Some(recipient) = again {
                let resend = resend.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = resend.send(recipient);
                });
            }
        }
        return Ok(());
    }
    let Some(sent) = in_flight.lock().remove(&receipt.message_id) else {
        return Ok(());
    };
    window.add_permits(1);
    let status = proto::ReceiptStatus::try_from(receipt.status)
        .map(|s| s.as_str_name())
        .unwrap_or("RECEIPT_STATUS_UNSPECIFIED");
    // Refused at ingest: no provider attempt, no provider status.
    let refused = status == "REJECTED" && receipt.attempt == 0 && receipt.provider_status == 0;
    if !refused {
        summary.accepted += 1;
    }
    if status == "DELIVERED" {
        summary.delivered += 1;
    } else {
        summary.failed += 1;
    }
    output.write(&Row {
        line: sent.line,
        message_id: &receipt.message_id,
        user_id: &sent.recipient.user_id,
        platform: platform_name(sent.recipient.platform),
        token: &sent.recipient.device_token,
        status,
        reason: &receipt.reason,
        field: &receipt.field,
        provider_status: receipt.provider_status,
        provider_message_id: &receipt.provider_message_id,
        attempt: receipt.attempt,
        completed_at_ms: receipt.completed_at_ms,
    })
}

/// Records in the file, for the progress bar's length (CSV: lines less the header, so quoted
/// line breaks make it an estimate).
fn count_records(path: &Path, format: Format) -> u64 {
    let Ok(file) = std::fs::File::open(path) else {
        return 0;
    };
    let lines = std::io::BufReader::new(file).split(b'\n').count() as u64;
    match format {
        Format::Csv => lines.saturating_sub(1),
        Format::Ndjson => lines,
    }
}

fn progress_bar(total: u64, hidden: bool) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if hidden {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} receipts  {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

fn progress_message(summary: &Summary, elapsed: Duration) -> String {
    let rate = summary.sent as f64 / elapsed.as_secs_f64().max(0.001);
    format!(
        "sent {} accepted {} delivered {} failed {} ({rate:.0}/s){}",
        summary.sent,
        summary.accepted,
        summary.delivered,
        summary.failed,
        if summary.skipped > 0 {
            format!(", {} skipped (done before)", summary.skipped)
        } else {
            String::new()
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_load_from_toml_and_json_in_the_proto_json_mapping() {
        let dir = tempfile_dir();
        let toml_path = dir.join("t.toml");
        std::fs::write(
            &toml_path,
            "title = \"Hi {{ name }}\"\nttl_seconds = 60\npriority = \"HIGH\"\n[data]\nk = \"v\"\n",
        )
        .unwrap();
        let t = load_template(&toml_path).unwrap();
        assert_eq!(t.title, "Hi {{ name }}");
        assert_eq!(t.ttl_seconds, 60);
        assert_eq!(t.priority, proto::Priority::High as i32);
        assert_eq!(t.data["k"], "v");
        let json_path = dir.join("t.json");
        std::fs::write(&json_path, r#"{"body": "b", "pushType": "BACKGROUND"}"#).unwrap();
        let t = load_template(&json_path).unwrap();
        assert_eq!(t.push_type, proto::PushType::Background as i32);
        std::fs::write(&toml_path, "priority = \"URGENT\"").unwrap();
        let e = load_template(&toml_path).unwrap_err().to_string();
        assert!(e.contains("priority"), "{e}");
    }

    #[test]
    fn done_through_advances_only_over_contiguous_lines() {
        let dir = tempfile_dir();
        let file = std::fs::File::create(dir.join("o")).unwrap();
        let mut out = Output {
            writer: BufWriter::new(file),
            format: Format::Csv,
            bytes: 0,
            state_path: dir.join("o.state"),
            state: State::default(),
            done_above: BTreeSet::new(),
        };
        out.done(2);
        out.done(3);
        assert_eq!(out.state.done_through, 0);
        out.done(1);
        assert_eq!(out.state.done_through, 3);
        out.done(5);
        assert_eq!((out.state.done_through, out.done_above.len()), (3, 1));
    }

    #[test]
    fn run_ids_are_stable_per_app_campaign_and_file() {
        let a = derived_run_id("shop", "c", Path::new("/nonexistent/a.csv"));
        assert_eq!(
            a,
            derived_run_id("shop", "c", Path::new("/nonexistent/a.csv"))
        );
        assert_ne!(
            a,
            derived_run_id("shop", "d", Path::new("/nonexistent/a.csv"))
        );
        assert_ne!(
            a,
            derived_run_id("shop", "c", Path::new("/nonexistent/b.csv"))
        );
        assert_eq!(a.len(), 16);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pushgate-send-unit-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
