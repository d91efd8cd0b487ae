//! Google credentials for FCM, and Application Default Credentials (ADC): where an app's access
//! tokens come from when no service-account key is configured.
//!
//! The order is the one Google's client libraries follow:
//! 1. `credentials_json` / `credentials_file` in the app's `[fcm]` section;
//! 2. the file named by `GOOGLE_APPLICATION_CREDENTIALS`;
//! 3. gcloud's well-known file (`$CLOUDSDK_CONFIG` or `~/.config/gcloud`, then
//!    `application_default_credentials.json`), written by `gcloud auth application-default login`;
//! 4. the GCE/GKE/Cloud Run metadata server (`GCE_METADATA_HOST`, else
//!    `metadata.google.internal`), which is what Workload Identity answers on GKE.
//!
//! A JSON credential file is one of `service_account` (a key: RS256 assertion at `token_uri`),
//! `external_account` (workload identity federation: a subject token read from a file or a URL,
//! printed by an executable, or an AWS SigV4-signed GetCallerIdentity request, exchanged at
//! Google STS, then optionally traded for a service
//! account's token at IAM Credentials) or `authorized_user` (a gcloud user's refresh token).
//!
//! Each [`Credential`] knows how to make one token request ([`Credential::fetch`]); caching,
//! single-flight refresh and retries are [`super::token_source::TokenSource`]'s. No secret (key, refresh
//! token, subject token, access token) reaches a `Debug` output or a log line.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request};
use serde::Deserialize;
use serde_json::Value;

use super::oauth::{
    AccessToken, CredentialsError, FetchError, SCOPE, ServiceAccountKey, parse_token_response,
};
use super::token_http::{CredentialHttp, form};
use crate::provider::config::require_https;

/// The metadata server's name inside Google Cloud.
pub const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";
/// The token path of the default service account on the metadata server.
pub const METADATA_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
/// The project id path on the metadata server.
pub const METADATA_PROJECT_PATH: &str = "/computeMetadata/v1/project/project-id";
/// Where gcloud's user credentials exchange a refresh token.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The scope STS is asked for: IAM Credentials needs it to impersonate, and FCM accepts it.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Lifetime asked of IAM Credentials when the file does not say (Google's default and maximum
/// without an org policy).
const DEFAULT_IMPERSONATION_LIFETIME_SECS: u64 = 3600;

/// Where an app's FCM access tokens come from.
pub enum Credential {
    /// A service-account key: an RS256 assertion exchanged at the key's `token_uri`.
    ServiceAccount(ServiceAccountKey),
    /// gcloud user credentials: a refresh token exchanged at `token_uri`.
    AuthorizedUser(AuthorizedUser),
    /// Workload identity federation.
    ExternalAccount(ExternalAccount),
    /// The metadata server of the VM, node or pod.
    Metadata(MetadataServer),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ServiceAccount(key) => key.fmt(f),
            Self::AuthorizedUser(user) => user.fmt(f),
            Self::ExternalAccount(account) => account.fmt(f),
            Self::Metadata(server) => server.fmt(f),
        }
    }
}

impl Credential {
    /// Parses a credential JSON file of any supported `type`.
    pub fn from_json(json: &str) -> Result<Self, CredentialsError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| CredentialsError::Json(e.to_string()))?;
        match value.get("type").and_then(Value::as_str) {
            None | Some("service_account") => {
                ServiceAccountKey::from_json(json).map(Self::ServiceAccount)
            }
            Some("authorized_user") => AuthorizedUser::from_value(value).map(Self::AuthorizedUser),
            Some("external_account") => {
                ExternalAccount::from_value(value).map(Self::ExternalAccount)
            }
            Some(other) => Err(CredentialsError::WrongType(other.to_string())),
        }
    }

    /// What kind of credential this is, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ServiceAccount(_) => "service_account",
            Self::AuthorizedUser(_) => "authorized_user",
            Self::ExternalAccount(_) => "external_account",
            Self::Metadata(_) => "metadata_server",
        }
    }

    /// Who the tokens are for, for log lines (never a secret).
    pub fn principal(&self) -> String {
        match self {
            Self::ServiceAccount(key) => key.client_email.clone(),
            Self::AuthorizedUser(user) => format!("gcloud user (client {})", user.client_id),
            Self::ExternalAccount(account) => match &account.impersonation_url {
                Some(url) => format!("{} via {}", account.audience, url),
                None => account.audience.clone(),
            },
            Self::Metadata(server) => format!("metadata server {}", server.host),
        }
    }

    /// The Firebase project the credential names, if it names one.
    pub fn project_id(&self) -> Option<&str> {
        match self {
            Self::ServiceAccount(key) => key.project_id.as_deref(),
            _ => None,
        }
    }

    /// One token request (two or three for federation). `Permanent` means the endpoint refused
    /// the credentials and the text says what to check.
    pub async fn fetch(
        &self,
        http: &CredentialHttp,
    ) -> Result<(AccessToken, Duration), FetchError> {
        match self {
            Self::ServiceAccount(key) => fetch_service_account(key, http).await,
            Self::AuthorizedUser(user) => user.fetch(http).await,
            Self::ExternalAccount(account) => account.fetch(http).await,
            Self::Metadata(server) => server.fetch(http).await,
        }
    }
}

async fn fetch_service_account(
    key: &ServiceAccountKey,
    http: &CredentialHttp,
) -> Result<(AccessToken, Duration), FetchError> {
    let assertion = key
        .assertion(unix_now())
        .map_err(|e| FetchError::Permanent(e.to_string()))?;
    let body = form(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", &assertion),
    ]);
    let answer = post_form(http, &key.token_uri, body, None).await?;
    parse_token_response(answer.status, &answer.body).map_err(|e| {
        e.with_hint(
            "the OAuth token endpoint rejected the service-account credentials",
            "check the key (deleted or revoked key, wrong account) and the gateway host's clock",
        )
    })
}

/// Sends a form POST; transport failures are transient.
async fn post_form(
    http: &CredentialHttp,
    uri: &str,
    body: Bytes,
    bearer: Option<&str>,
) -> Result<super::token_http::HttpAnswer, FetchError> {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        )
        .header("accept", HeaderValue::from_static("application/json"));
    if let Some(token) = bearer {
        request = request.header(AUTHORIZATION, bearer_header(token)?);
    }
    let request = request
        .body(body)
        .map_err(|e| FetchError::Permanent(format!("invalid token request to `{uri}`: {e}")))?;
    http.send(request).await.map_err(FetchError::Transient)
}

fn bearer_header(token: &str) -> Result<HeaderValue, FetchError> {
    HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| FetchError::Transient("a token is not a valid header value".into()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---- authorized_user ---------------------------------------------------------------------

/// gcloud user credentials (`gcloud auth application-default login`).
pub struct AuthorizedUser {
    pub client_id: String,
    client_secret: String,
    refresh_token: String,
    pub token_uri: String,
}

impl std::fmt::Debug for AuthorizedUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizedUser")
            .field("client_id", &self.client_id)
            .field("token_uri", &self.token_uri)
            .field("client_secret", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .finish()
    }
}

impl AuthorizedUser {
    fn from_value(value: Value) -> Result<Self, CredentialsError> {
        let field = |name: &'static str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string)
                .ok_or(CredentialsError::Missing(name))
        };
        let token_uri = value
            .get("token_uri")
            .and_then(Value::as_str)
            .unwrap_or(GOOGLE_TOKEN_URI)
            .to_string();
        check_url(&token_uri, "token_uri")?;
        Ok(Self {
            client_id: field("client_id")?,
            client_secret: field("client_secret")?,
            refresh_token: field("refresh_token")?,
            token_uri,
        })
    }

    async fn fetch(&self, http: &CredentialHttp) -> Result<(AccessToken, Duration), FetchError> {
        let body = form(&[
            ("grant_type", "refresh_token"),
            ("client_id", &self.client_id),
            ("client_secret", &self.client_secret),
            ("refresh_token", &self.refresh_token),
        ]);
        let answer = post_form(http, &self.token_uri, body, None).await?;
        parse_token_response(answer.status, &answer.body).map_err(|e| {
            e.with_hint(
                "the OAuth token endpoint rejected the gcloud user credentials",
                "run `gcloud auth application-default login` again",
            )
        })
    }
}

// ---- external_account --------------------------------------------------------------------

/// Where a federated workload's subject token is read, at every refresh (the platform rotates
/// it: a projected Kubernetes service-account token, an OIDC token file, a local token URL).
#[derive(Debug, Clone)]
pub enum SubjectSource {
    File {
        path: PathBuf,
        format: SubjectFormat,
    },
    Url {
        url: String,
        headers: Vec<(String, String)>,
        format: SubjectFormat,
    },
    /// Google's executable-sourced ("pluggable") credentials: a command that prints the token.
    Executable(Executable),
    /// AWS (`environment_id = "aws1"`): a SigV4-signed STS GetCallerIdentity request, with the
    /// region and credentials from the environment or the EC2 instance metadata service.
    Aws(AwsSource),
}

/// `credential_source` of `environment_id` `aws1`.
#[derive(Debug, Clone)]
pub struct AwsSource {
    /// The instance's availability zone (the region is it without its last letter).
    pub region_url: Option<String>,
    /// The instance's role name, and under it the role's credentials.
    pub url: Option<String>,
    /// The GetCallerIdentity URL, `{region}` replaced.
    pub verification_url: String,
    /// IMDSv2: where a session token for the metadata requests is obtained first.
    pub imdsv2_session_token_url: Option<String>,
}

/// AWS credentials; the secret and the session token never reach a `Debug` output.
#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// `credential_source.executable`: the command is run (only with
/// `GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1`) with the `GOOGLE_EXTERNAL_ACCOUNT_*` variables
/// Google's libraries set, and prints a JSON response
/// (`{"version": 1, "success": true, "token_type": ..., "id_token" | "saml_response": ...,
/// "expiration_time": <epoch s>}`). A response is used until its `expiration_time`, from memory
/// or from `output_file` (where the executable may cache it), and refused once past it.
#[derive(Debug)]
pub struct Executable {
    /// The program and its arguments (the `command` split on whitespace, as Google's libraries
    /// split it).
    pub command: Vec<String>,
    pub timeout: Duration,
    pub output_file: Option<PathBuf>,
    /// The last response's token and expiry; never in a `Debug` output.
    cached: parking_lot::Mutex<Option<CachedSubject>>,
}

impl Clone for Executable {
    fn clone(&self) -> Self {
        Self {
            command: self.command.clone(),
            timeout: self.timeout,
            output_file: self.output_file.clone(),
            cached: parking_lot::Mutex::new(None),
        }
    }
}

struct CachedSubject {
    token: String,
    expires: SystemTime,
}

impl std::fmt::Debug for CachedSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSubject")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// The variable that must be `1` before any credential file may run a command.
pub const ALLOW_EXECUTABLES: &str = "GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES";
/// An executable's timeout: default, and the bounds Google's libraries accept.
const EXECUTABLE_TIMEOUT_DEFAULT_MS: u64 = 30_000;
const EXECUTABLE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 5_000..=120_000;
/// A cached subject token is not used within this long of its expiry (STS must still accept it).
const SUBJECT_EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// Bytes of an executable's stderr quoted in an error, at most.
const QUOTED_STDERR_BYTES: usize = 300;

/// How the subject token is stored in its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectFormat {
    /// The whole content, trimmed.
    Text,
    /// A JSON object; the token is this field.
    Json(String),
}

/// Workload identity federation (`type = external_account`).
pub struct ExternalAccount {
    pub audience: String,
    pub subject_token_type: String,
    /// Google STS (`https://sts.googleapis.com/v1/token`).
    pub token_url: String,
    /// IAM Credentials `generateAccessToken` of the service account to impersonate.
    pub impersonation_url: Option<String>,
    pub impersonation_lifetime_secs: u64,
    pub source: SubjectSource,
    /// Workforce pools bill this project (`options.userProject`).
    pub workforce_pool_user_project: Option<String>,
}

impl std::fmt::Debug for ExternalAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalAccount")
            .field("audience", &self.audience)
            .field("subject_token_type", &self.subject_token_type)
            .field("token_url", &self.token_url)
            .field("impersonation_url", &self.impersonation_url)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ExternalFile {
    audience: Option<String>,
    subject_token_type: Option<String>,
    token_url: Option<String>,
    service_account_impersonation_url: Option<String>,
    service_account_impersonation: Option<ImpersonationOptions>,
    credential_source: Option<SourceFile>,
    workforce_pool_user_project: Option<String>,
}

#[derive(Deserialize)]
struct ImpersonationOptions {
    token_lifetime_seconds: Option<u64>,
}

#[derive(Deserialize)]
struct SourceFile {
    file: Option<String>,
    url: Option<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    format: Option<FormatFile>,
    environment_id: Option<String>,
    executable: Option<ExecutableFile>,
    region_url: Option<String>,
    regional_cred_verification_url: Option<String>,
    imdsv2_session_token_url: Option<String>,
}

#[derive(Deserialize)]
struct ExecutableFile {
    command: Option<String>,
    timeout_millis: Option<u64>,
    output_file: Option<String>,
}

#[derive(Deserialize)]
struct FormatFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    subject_token_field_name: Option<String>,
}

impl ExternalAccount {
    fn from_value(value: Value) -> Result<Self, CredentialsError> {
        let file: ExternalFile =
            serde_json::from_value(value).map_err(|e| CredentialsError::Json(e.to_string()))?;
        let present = |v: Option<String>, name: &'static str| {
            v.filter(|s| !s.trim().is_empty())
                .ok_or(CredentialsError::Missing(name))
        };
        let audience = present(file.audience, "audience")?;
        let subject_token_type = present(file.subject_token_type, "subject_token_type")?;
        let token_url = present(file.token_url, "token_url")?;
        check_url(&token_url, "token_url")?;
        let impersonation_url = file
            .service_account_impersonation_url
            .filter(|s| !s.trim().is_empty());
        if let Some(url) = &impersonation_url {
            check_url(url, "service_account_impersonation_url")?;
        }
        let source = file
            .credential_source
            .ok_or(CredentialsError::Missing("credential_source"))?;
        let aws = if let Some(environment) = source.environment_id.clone() {
            if environment != "aws1" {
                return Err(CredentialsError::Unsupported(format!(
                    "`credential_source.environment_id` `{environment}` (aws1 is supported)"
                )));
            }
            let verification_url = source
                .regional_cred_verification_url
                .clone()
                .filter(|u| !u.trim().is_empty())
                .ok_or(CredentialsError::Missing(
                    "credential_source.regional_cred_verification_url",
                ))?;
            Some(SubjectSource::Aws(AwsSource {
                region_url: source.region_url.clone().filter(|u| !u.is_empty()),
                url: source.url.clone().filter(|u| !u.is_empty()),
                verification_url,
                imdsv2_session_token_url: source
                    .imdsv2_session_token_url
                    .clone()
                    .filter(|u| !u.is_empty()),
            }))
        } else {
            None
        };
        let format = match source.format {
            None => SubjectFormat::Text,
            Some(format) => match format.kind.as_deref() {
                None | Some("text") => SubjectFormat::Text,
                Some("json") => SubjectFormat::Json(
                    format
                        .subject_token_field_name
                        .filter(|s| !s.is_empty())
                        .ok_or(CredentialsError::Missing(
                            "credential_source.format.subject_token_field_name",
                        ))?,
                ),
                Some(other) => {
                    return Err(CredentialsError::Unsupported(format!(
                        "`credential_source.format.type` `{other}` (use text or json)"
                    )));
                }
            },
        };
        let source = match (aws, source.file, source.url, source.executable) {
            (Some(aws), ..) => aws,
            (None, None, None, Some(executable)) => {
                let command: Vec<String> = executable
                    .command
                    .as_deref()
                    .unwrap_or("")
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                if command.is_empty() {
                    return Err(CredentialsError::Missing(
                        "credential_source.executable.command",
                    ));
                }
                let timeout_ms = executable
                    .timeout_millis
                    .unwrap_or(EXECUTABLE_TIMEOUT_DEFAULT_MS);
                if !EXECUTABLE_TIMEOUT_MS.contains(&timeout_ms) {
                    return Err(CredentialsError::Unsupported(
                        "`credential_source.executable.timeout_millis` outside 5000..=120000"
                            .into(),
                    ));
                }
                SubjectSource::Executable(Executable {
                    command,
                    timeout: Duration::from_millis(timeout_ms),
                    output_file: executable
                        .output_file
                        .filter(|f| !f.trim().is_empty())
                        .map(PathBuf::from),
                    cached: parking_lot::Mutex::new(None),
                })
            }
            (None, Some(path), None, None) => SubjectSource::File {
                path: PathBuf::from(path),
                format,
            },
            (None, None, Some(url), None) => {
                check_url(&url, "credential_source.url")?;
                SubjectSource::Url {
                    url,
                    headers: source.headers.into_iter().collect(),
                    format,
                }
            }
            _ => return Err(CredentialsError::Missing("credential_source.file")),
        };
        Ok(Self {
            audience,
            subject_token_type,
            token_url,
            impersonation_url,
            impersonation_lifetime_secs: file
                .service_account_impersonation
                .and_then(|o| o.token_lifetime_seconds)
                .unwrap_or(DEFAULT_IMPERSONATION_LIFETIME_SECS)
                .clamp(600, 43_200),
            source,
            workforce_pool_user_project: file.workforce_pool_user_project.filter(|s| !s.is_empty()),
        })
    }

    /// The email of the impersonated service account, from
    /// `.../serviceAccounts/<email>:generateAccessToken`.
    fn impersonated_email(&self) -> Option<&str> {
        let url = self.impersonation_url.as_deref()?;
        let tail = url.rsplit_once("/serviceAccounts/")?.1;
        Some(tail.split_once(':').map_or(tail, |(email, _)| email))
    }

    async fn subject_token(&self, http: &CredentialHttp) -> Result<String, FetchError> {
        let (raw, format, from) = match &self.source {
            SubjectSource::Executable(executable) => return self.run(executable).await,
            SubjectSource::Aws(aws) => {
                let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
                let given = AwsEnvironment::read(&env);
                return aws_subject_token(aws, &self.audience, http, given, SystemTime::now())
                    .await;
            }
            SubjectSource::File { path, format } => {
                let raw = tokio::fs::read_to_string(path).await.map_err(|e| {
                    FetchError::Transient(format!(
                        "reading the subject token file {}: {e}",
                        path.display()
                    ))
                })?;
                (raw, format, path.display().to_string())
            }
            SubjectSource::Url {
                url,
                headers,
                format,
            } => {
                let mut request = Request::builder().method(Method::GET).uri(url.as_str());
                for (name, value) in headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                let request = request.body(Bytes::new()).map_err(|e| {
                    FetchError::Permanent(format!("invalid credential_source.url request: {e}"))
                })?;
                let answer = http.send(request).await.map_err(|e| {
                    FetchError::Transient(format!("fetching the subject token from {url}: {e}"))
                })?;
                if answer.status != 200 {
                    return Err(FetchError::Transient(format!(
                        "the subject token URL {url} answered HTTP {}",
                        answer.status
                    )));
                }
                (
                    String::from_utf8_lossy(&answer.body).into_owned(),
                    format,
                    url.clone(),
                )
            }
        };
        let token = match format {
            SubjectFormat::Text => raw.trim().to_string(),
            SubjectFormat::Json(field) => serde_json::from_str::<Value>(&raw)
                .ok()
                .and_then(|v| v.get(field).and_then(Value::as_str).map(str::to_string))
                .ok_or_else(|| {
                    FetchError::Transient(format!(
                        "the subject token in {from} is not a JSON object with a `{field}` string"
                    ))
                })?,
        };
        if token.is_empty() {
            return Err(FetchError::Transient(format!(
                "the subject token in {from} is empty"
            )));
        }
        Ok(token)
    }

    /// The executable's subject token: a cached response still valid, else the command's.
    /// (Whether commands may run at all was decided at start, by [`discover`].)
    async fn run(&self, executable: &Executable) -> Result<String, FetchError> {
        let now = SystemTime::now();
        if let Some(cached) = executable.cached.lock().as_ref()
            && cached.expires > now + SUBJECT_EXPIRY_MARGIN
        {
            return Ok(cached.token.clone());
        }
        if let Some(path) = &executable.output_file
            && let Ok(text) = tokio::fs::read_to_string(path).await
            // A cached response that is unreadable, failed, expired or without an expiry is
            // ignored and the command run, as Google's libraries do.
            && let Ok(Some(subject)) = parse_executable_response(&text, now)
                .map(|(token, expires)| expires.map(|e| (token, e)))
            && subject.1 > now + SUBJECT_EXPIRY_MARGIN
        {
            let token = subject.0.clone();
            *executable.cached.lock() = Some(CachedSubject {
                token: subject.0,
                expires: subject.1,
            });
            return Ok(token);
        }
        let program = &executable.command[0];
        let mut command = tokio::process::Command::new(program);
        command
            .args(&executable.command[1..])
            .env("GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE", &self.audience)
            .env(
                "GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE",
                &self.subject_token_type,
            )
            .env("GOOGLE_EXTERNAL_ACCOUNT_INTERACTIVE", "0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(email) = self.impersonated_email() {
            command.env("GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL", email);
        }
        if let Some(path) = &executable.output_file {
            command.env("GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE", path);
        }
        let output = tokio::time::timeout(executable.timeout, command.output())
            .await
            .map_err(|_| {
                FetchError::Transient(format!(
                    "the credential executable {program} did not finish within {:?}",
                    executable.timeout
                ))
            })?
            .map_err(|e| {
                FetchError::Transient(format!("running the credential executable {program}: {e}"))
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let mut quoted = stderr.trim().to_string();
            if quoted.len() > QUOTED_STDERR_BYTES {
                let mut cut = QUOTED_STDERR_BYTES;
                while !quoted.is_char_boundary(cut) {
                    cut -= 1;
                }
                quoted.truncate(cut);
            }
            return Err(FetchError::Transient(format!(
                "the credential executable {program} exited with {}: {quoted}",
                output.status
            )));
        }
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        if text.trim().is_empty()
            && let Some(path) = &executable.output_file
        {
            // The executable may answer in its output file only.
            text = tokio::fs::read_to_string(path).await.unwrap_or_default();
        }
        let (token, expires) =
            parse_executable_response(&text, SystemTime::now()).map_err(|e| match e {
                FetchError::Permanent(reason) => {
                    FetchError::Permanent(format!("the credential executable {program}: {reason}"))
                }
                FetchError::Transient(reason) => {
                    FetchError::Transient(format!("the credential executable {program}: {reason}"))
                }
            })?;
        *executable.cached.lock() = expires.map(|expires| CachedSubject {
            token: token.clone(),
            expires,
        });
        Ok(token)
    }

    async fn fetch(&self, http: &CredentialHttp) -> Result<(AccessToken, Duration), FetchError> {
        let subject = self.subject_token(http).await?;
        let options = self
            .workforce_pool_user_project
            .as_ref()
            .map(|project| serde_json::json!({ "userProject": project }).to_string());
        let mut pairs = vec![
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("audience", self.audience.as_str()),
            ("scope", CLOUD_PLATFORM_SCOPE),
            ("requested_token_type", ACCESS_TOKEN_TYPE),
            ("subject_token", subject.as_str()),
            ("subject_token_type", self.subject_token_type.as_str()),
        ];
        if let Some(options) = &options {
            pairs.push(("options", options.as_str()));
        }
        let answer = post_form(http, &self.token_url, form(&pairs), None).await?;
        let (federated, lifetime) =
            parse_token_response(answer.status, &answer.body).map_err(|e| {
                e.with_hint(
                    "Google STS rejected the workload's subject token",
                    "check the credential file's `audience` (pool and provider), the provider's \
                     attribute condition, and that the subject token file is current",
                )
            })?;
        let Some(url) = &self.impersonation_url else {
            return Ok((federated, lifetime));
        };
        let body = serde_json::json!({
            "scope": [SCOPE],
            "lifetime": format!("{}s", self.impersonation_lifetime_secs),
        });
        let request = Request::builder()
            .method(Method::POST)
            .uri(url.as_str())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(AUTHORIZATION, bearer_header(federated.secret())?)
            .body(Bytes::from(body.to_string()))
            .map_err(|e| FetchError::Permanent(format!("invalid impersonation request: {e}")))?;
        let answer = http.send(request).await.map_err(FetchError::Transient)?;
        parse_impersonation_response(answer.status, &answer.body, SystemTime::now()).map_err(|e| {
            e.with_hint(
                "IAM Credentials refused to impersonate the service account",
                "grant the federated principal roles/iam.workloadIdentityUser (or Service Account \
                 Token Creator) on the service account",
            )
        })
    }
}

// ---- AWS subject tokens ------------------------------------------------------------------

/// The AWS subject token Google STS expects (`urn:ietf:params:aws:token-type:aws4_request`): a
/// GetCallerIdentity request signed with the workload's AWS credentials, serialized as JSON and
/// URL-encoded; STS replays it to AWS to learn who the caller is. The region and the
/// credentials come from `AWS_REGION`/`AWS_DEFAULT_REGION` and `AWS_ACCESS_KEY_ID`/
/// `AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN` when set, else from the instance metadata
/// service (`region_url`, `url`; with an IMDSv2 session token when
/// `imdsv2_session_token_url` is given).
pub async fn aws_subject_token(
    source: &AwsSource,
    audience: &str,
    http: &CredentialHttp,
    given: AwsEnvironment,
    now: SystemTime,
) -> Result<String, FetchError> {
    let AwsEnvironment {
        region,
        credentials: from_env,
    } = given;
    let session = match &source.imdsv2_session_token_url {
        Some(url) if region.is_none() || from_env.is_none() => {
            let request = Request::builder()
                .method(Method::PUT)
                .uri(url.as_str())
                .header("x-aws-ec2-metadata-token-ttl-seconds", "300")
                .body(Bytes::new())
                .map_err(|e| {
                    FetchError::Permanent(format!("invalid imdsv2_session_token_url: {e}"))
                })?;
            Some(metadata_text(http, request, "the IMDSv2 session token").await?)
        }
        _ => None,
    };
    let get = |url: &str| -> Result<Request<Bytes>, FetchError> {
        let mut request = Request::builder().method(Method::GET).uri(url);
        if let Some(token) = &session {
            request = request.header("x-aws-ec2-metadata-token", token.as_str());
        }
        request
            .body(Bytes::new())
            .map_err(|e| FetchError::Permanent(format!("invalid AWS metadata URL {url}: {e}")))
    };
    let region = match region {
        Some(region) => region,
        None => {
            let url = source.region_url.as_deref().ok_or_else(|| {
                FetchError::Permanent(
                    "no AWS region: set AWS_REGION, or `credential_source.region_url`".into(),
                )
            })?;
            let zone = metadata_text(http, get(url)?, "the availability zone").await?;
            // `us-east-2b` is in `us-east-2`.
            let mut region = zone;
            region.pop();
            region
        }
    };
    let credentials = match from_env {
        Some(credentials) => credentials,
        None => {
            let url = source.url.as_deref().ok_or_else(|| {
                FetchError::Permanent(
                    "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or `credential_source.url`"
                        .into(),
                )
            })?;
            let role = metadata_text(http, get(url)?, "the instance role name").await?;
            let url = format!("{}/{}", url.trim_end_matches('/'), role);
            let json = metadata_text(http, get(&url)?, "the role's credentials").await?;
            let value: Value = serde_json::from_str(&json).map_err(|_| {
                FetchError::Transient("the role's AWS credentials are not JSON".into())
            })?;
            let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_string);
            AwsCredentials {
                access_key_id: field("AccessKeyId").ok_or_else(|| {
                    FetchError::Transient("the role's AWS credentials have no AccessKeyId".into())
                })?,
                secret_access_key: field("SecretAccessKey").ok_or_else(|| {
                    FetchError::Transient(
                        "the role's AWS credentials have no SecretAccessKey".into(),
                    )
                })?,
                session_token: field("Token"),
            }
        }
    };
    let url = source.verification_url.replace("{region}", &region);
    let mut headers = sign_aws_request("POST", &url, &region, &credentials, now)
        .map_err(|e| FetchError::Permanent(format!("regional_cred_verification_url: {e}")))?;
    // Names the pool provider the request is meant for, so a captured token cannot be replayed
    // at another provider (Google's libraries add it after signing, as here).
    headers.push(("x-goog-cloud-target-resource".into(), audience.to_string()));
    let request = serde_json::json!({
        "headers": headers
            .iter()
            .map(|(key, value)| serde_json::json!({"key": key, "value": value}))
            .collect::<Vec<_>>(),
        "method": "POST",
        "url": url,
    });
    Ok(uri_encode(&request.to_string(), "/"))
}

/// What the process environment says of AWS: the region and the credentials, when set.
#[derive(Debug, Default)]
pub struct AwsEnvironment {
    pub region: Option<String>,
    pub credentials: Option<AwsCredentials>,
}

impl AwsEnvironment {
    /// `AWS_REGION` (else `AWS_DEFAULT_REGION`), and `AWS_ACCESS_KEY_ID` with
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`).
    pub fn read(env: Env<'_>) -> Self {
        Self {
            region: env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")),
            credentials: match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                (Some(access_key_id), Some(secret_access_key)) => Some(AwsCredentials {
                    access_key_id,
                    secret_access_key,
                    session_token: env("AWS_SESSION_TOKEN"),
                }),
                _ => None,
            },
        }
    }
}

/// The text of a 200 from the instance metadata service.
async fn metadata_text(
    http: &CredentialHttp,
    request: Request<Bytes>,
    what: &str,
) -> Result<String, FetchError> {
    let url = request.uri().to_string();
    let answer = http
        .send(request)
        .await
        .map_err(|e| FetchError::Transient(format!("fetching {what} from {url}: {e}")))?;
    if answer.status != 200 {
        return Err(FetchError::Transient(format!(
            "fetching {what}: {url} answered HTTP {}",
            answer.status
        )));
    }
    let text = String::from_utf8_lossy(&answer.body).trim().to_string();
    if text.is_empty() {
        return Err(FetchError::Transient(format!(
            "{url} answered nothing for {what}"
        )));
    }
    Ok(text)
}

/// AWS Signature Version 4 of a request without a body: the headers to send (`Authorization`,
/// `host`, `x-amz-date`, and `x-amz-security-token` with temporary credentials). The service is
/// the host's first label (`sts`).
pub fn sign_aws_request(
    method: &str,
    url: &str,
    region: &str,
    credentials: &AwsCredentials,
    now: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    use ring::hmac;
    use sha2::{Digest, Sha256};
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url} is not an https:// URL"));
    }
    let host = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{url} has no host"))?;
    let service = host.split('.').next().unwrap_or_default().to_string();
    let timestamp = jiff::Timestamp::try_from(now).map_err(|e| e.to_string())?;
    let amz_date = timestamp.strftime("%Y%m%dT%H%M%SZ").to_string();
    let date = timestamp.strftime("%Y%m%d").to_string();
    let mut query: Vec<(String, String)> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (uri_encode(k, ""), uri_encode(v, ""))
        })
        .collect();
    query.sort();
    let query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut headers = vec![("host", host.clone()), ("x-amz-date", amz_date.clone())];
    if let Some(token) = &credentials.session_token {
        headers.push(("x-amz-security-token", token.clone()));
    }
    let canonical_headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}:{}\n", v.trim()))
        .collect();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(";");
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let payload_hash = hex(&Sha256::digest(b""));
    let path = if uri.path().is_empty() {
        "/"
    } else {
        uri.path()
    };
    let canonical_request =
        format!("{method}\n{path}\n{query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}");
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let mac = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
            .as_ref()
            .to_vec()
    };
    let key = mac(
        format!("AWS4{}", credentials.secret_access_key).as_bytes(),
        &date,
    );
    let key = mac(&key, region);
    let key = mac(&key, &service);
    let key = mac(&key, "aws4_request");
    let signature = hex(&mac(&key, &string_to_sign));
    let mut out = vec![(
        "Authorization".to_string(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            credentials.access_key_id
        ),
    )];
    out.extend(headers.into_iter().map(|(k, v)| (k.to_string(), v)));
    Ok(out)
}

/// Percent-encodes all but the unreserved characters (RFC 3986) and those in `safe`.
fn uri_encode(text: &str, safe: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || safe.as_bytes().contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An executable's JSON response at `now`: the subject token and, when given, when it expires.
/// `Permanent` for an answer the executable means as a refusal (`success: false`) or one that
/// breaks the format; `Transient` for an expired token (running it again may give a fresh one).
pub fn parse_executable_response(
    text: &str,
    now: SystemTime,
) -> Result<(String, Option<SystemTime>), FetchError> {
    let bad = |what: &str| FetchError::Permanent(format!("its response {what}"));
    let response: Value =
        serde_json::from_str(text.trim()).map_err(|_| bad("is not a JSON object"))?;
    match response.get("version").and_then(Value::as_u64) {
        Some(1) => {}
        Some(v) => return Err(bad(&format!("has version {v}; version 1 is supported"))),
        None => return Err(bad("has no `version`")),
    }
    match response.get("success").and_then(Value::as_bool) {
        Some(true) => {}
        Some(false) => {
            let field = |name: &str| {
                response
                    .get(name)
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    .unwrap_or_default()
            };
            return Err(FetchError::Permanent(format!(
                "it answered unsuccessful: code {}, message {}",
                field("code"),
                field("message")
            )));
        }
        None => return Err(bad("has no `success`")),
    }
    let expires = match response.get("expiration_time") {
        None => None,
        Some(v) => {
            let secs = v
                .as_u64()
                .ok_or_else(|| bad("has an `expiration_time` that is not epoch seconds"))?;
            let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            if expires <= now {
                return Err(FetchError::Transient(
                    "the token it returned is expired (`expiration_time` has passed)".into(),
                ));
            }
            Some(expires)
        }
    };
    let field = match response.get("token_type").and_then(Value::as_str) {
        Some("urn:ietf:params:oauth:token-type:jwt")
        | Some("urn:ietf:params:oauth:token-type:id_token") => "id_token",
        Some("urn:ietf:params:oauth:token-type:saml2") => "saml_response",
        Some(other) => return Err(bad(&format!("has the unsupported `token_type` {other}"))),
        None => return Err(bad("has no `token_type`")),
    };
    let token = response
        .get(field)
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad(&format!("has no `{field}`")))?;
    Ok((token.to_string(), expires))
}

/// Classifies an IAM Credentials `generateAccessToken` answer:
/// `{"accessToken": "...", "expireTime": "2026-12-03T16:00:00Z"}`, or a Google error.
pub fn parse_impersonation_response(
    status: u16,
    body: &[u8],
    now: SystemTime,
) -> Result<(AccessToken, Duration), FetchError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if status == 200 {
        let token = json
            .as_ref()
            .and_then(|j| j.get("accessToken"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| FetchError::Transient("HTTP 200 without a usable accessToken".into()))?;
        let expires = json
            .as_ref()
            .and_then(|j| j.get("expireTime"))
            .and_then(Value::as_str)
            .and_then(parse_rfc3339)
            .ok_or_else(|| FetchError::Transient("HTTP 200 without a valid expireTime".into()))?;
        let lifetime = expires.duration_since(now).unwrap_or(Duration::ZERO);
        return Ok((AccessToken::new(token), lifetime));
    }
    let error = json.as_ref().and_then(|j| j.get("error"));
    let message = error.and_then(|e| e.get("message")).and_then(Value::as_str);
    let code = error.and_then(|e| e.get("status")).and_then(Value::as_str);
    let reason = match (code, message) {
        (Some(c), Some(m)) => format!("HTTP {status} {c}: {m}"),
        (Some(c), None) => format!("HTTP {status} {c}"),
        (None, Some(m)) => format!("HTTP {status}: {m}"),
        (None, None) => format!("HTTP {status}"),
    };
    if matches!(status, 408 | 429 | 500..=599) {
        Err(FetchError::Transient(reason))
    } else {
        Err(FetchError::Permanent(reason))
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (what Google's APIs send) as a time; other offsets are not
/// accepted.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.strip_suffix('Z').or_else(|| text.strip_suffix('z'))?;
    let (date, time) = text.split_once(['T', 't'])?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let (hms, fraction) = match time.split_once('.') {
        Some((hms, fraction)) => (hms, Some(fraction)),
        None => (time, None),
    };
    let mut t = hms.splitn(3, ':');
    let hour: i64 = t.next()?.parse().ok()?;
    let minute: i64 = t.next()?.parse().ok()?;
    let second: i64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let nanos = match fraction {
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            let digits = &f[..f.len().min(9)];
            digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
        }
        Some(_) => return None,
        None => 0,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

// ---- metadata server ---------------------------------------------------------------------

/// The GCE/GKE metadata server: tokens of the instance's (or, with GKE Workload Identity, the
/// pod's Kubernetes service account's) Google service account.
pub struct MetadataServer {
    /// `host[:port]`, cleartext HTTP as on every Google Cloud runtime.
    pub host: String,
}

impl std::fmt::Debug for MetadataServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataServer")
            .field("host", &self.host)
            .finish()
    }
}

impl MetadataServer {
    fn get(&self, path: &str) -> Result<Request<Bytes>, FetchError> {
        Request::builder()
            .method(Method::GET)
            .uri(format!("http://{}{path}", self.host))
            .header("metadata-flavor", HeaderValue::from_static("Google"))
            .body(Bytes::new())
            .map_err(|e| {
                FetchError::Permanent(format!("invalid metadata host `{}`: {e}", self.host))
            })
    }

    /// An answer from something that is not a metadata server (a proxy, a captive portal)
    /// lacks the `Metadata-Flavor: Google` response header.
    fn check_flavor(&self, answer: &super::token_http::HttpAnswer) -> Result<(), FetchError> {
        let flavor = answer
            .headers
            .get("metadata-flavor")
            .and_then(|v| v.to_str().ok());
        if flavor != Some("Google") {
            return Err(FetchError::Transient(format!(
                "{} answered HTTP {} without `Metadata-Flavor: Google`: not a metadata server",
                self.host, answer.status
            )));
        }
        Ok(())
    }

    async fn fetch(&self, http: &CredentialHttp) -> Result<(AccessToken, Duration), FetchError> {
        let answer = http
            .send(self.get(METADATA_TOKEN_PATH)?)
            .await
            .map_err(|e| {
                FetchError::Transient(format!(
                    "the metadata server {} is unreachable ({e}); outside Google Cloud, set \
                 credentials_file or GOOGLE_APPLICATION_CREDENTIALS",
                    self.host
                ))
            })?;
        self.check_flavor(&answer)?;
        parse_token_response(answer.status, &answer.body).map_err(|e| {
            e.with_hint(
                "the metadata server refused a token for the default service account",
                "check that the VM or node has a service account (GKE: that Workload Identity \
                 binds the pod's Kubernetes service account to a Google service account)",
            )
        })
    }

    /// The project the VM or pod runs in.
    pub async fn project_id(&self, http: &CredentialHttp) -> Result<String, String> {
        let request = self.get(METADATA_PROJECT_PATH).map_err(|e| e.to_string())?;
        let answer = http
            .send(request)
            .await
            .map_err(|e| format!("the metadata server {} is unreachable: {e}", self.host))?;
        self.check_flavor(&answer).map_err(|e| e.to_string())?;
        let id = String::from_utf8_lossy(&answer.body).trim().to_string();
        if answer.status != 200 || id.is_empty() {
            return Err(format!(
                "the metadata server {} answered HTTP {} to the project id request",
                self.host, answer.status
            ));
        }
        Ok(id)
    }
}

// ---- discovery ---------------------------------------------------------------------------

/// A credential and where it was found.
#[derive(Debug)]
pub struct Discovered {
    pub credential: Credential,
    /// Where it came from, for the start-up log line (`GOOGLE_APPLICATION_CREDENTIALS
    /// (/var/secrets/sa.json)`, ...).
    pub source: String,
}

/// Why discovery failed: the config field to name and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryError {
    pub field: &'static str,
    pub reason: String,
}

/// What discovery reads from the process environment (injected in tests).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Finds the credential of an app: the configured JSON or file, else ADC in Google's order.
pub fn discover(
    credentials_json: Option<&str>,
    credentials_file: Option<&Path>,
    env: Env<'_>,
) -> Result<Discovered, DiscoveryError> {
    let field = if credentials_json.is_some() {
        "credentials_json"
    } else {
        "credentials_file"
    };
    allowed(find(credentials_json, credentials_file, env), field, env)
}

fn find(
    credentials_json: Option<&str>,
    credentials_file: Option<&Path>,
    env: Env<'_>,
) -> Result<Discovered, DiscoveryError> {
    if let Some(json) = credentials_json {
        let credential = Credential::from_json(json).map_err(|e| DiscoveryError {
            field: "credentials_json",
            reason: e.to_string(),
        })?;
        return Ok(Discovered {
            credential,
            source: "credentials_json".into(),
        });
    }
    if let Some(path) = credentials_file {
        return from_file(
            path,
            "credentials_file",
            format!("credentials_file ({})", path.display()),
        );
    }
    if let Some(path) = env("GOOGLE_APPLICATION_CREDENTIALS") {
        let path = PathBuf::from(path);
        return from_file(
            &path,
            "credentials_file",
            format!("GOOGLE_APPLICATION_CREDENTIALS ({})", path.display()),
        )
        .map_err(|e| DiscoveryError {
            field: e.field,
            reason: format!("GOOGLE_APPLICATION_CREDENTIALS: {}", e.reason),
        });
    }
    let gcloud_dir = env("CLOUDSDK_CONFIG")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|home| Path::new(&home).join(".config").join("gcloud")));
    if let Some(dir) = gcloud_dir {
        let path = dir.join("application_default_credentials.json");
        if path.is_file() {
            return from_file(
                &path,
                "credentials_file",
                format!(
                    "gcloud application default credentials ({})",
                    path.display()
                ),
            );
        }
    }
    let host = env("GCE_METADATA_HOST").unwrap_or_else(|| DEFAULT_METADATA_HOST.to_string());
    if host.contains('/') || host.trim().is_empty() || host.parse::<http::uri::Authority>().is_err()
    {
        return Err(DiscoveryError {
            field: "credentials",
            reason: format!("GCE_METADATA_HOST `{host}` is not a host[:port]"),
        });
    }
    Ok(Discovered {
        source: format!("the metadata server ({host})"),
        credential: Credential::Metadata(MetadataServer { host }),
    })
}

/// Refuses at start a credential that would run a command unless the operator allowed it
/// (`GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1`, as Google's libraries require).
fn allowed(
    discovered: Result<Discovered, DiscoveryError>,
    field: &'static str,
    env: Env<'_>,
) -> Result<Discovered, DiscoveryError> {
    let discovered = discovered?;
    if let Credential::ExternalAccount(account) = &discovered.credential
        && matches!(account.source, SubjectSource::Executable(_))
        && env(ALLOW_EXECUTABLES).as_deref() != Some("1")
    {
        return Err(DiscoveryError {
            field,
            reason: format!(
                "{}: `credential_source.executable` runs a command; set {ALLOW_EXECUTABLES}=1 to allow it",
                discovered.source
            ),
        });
    }
    Ok(discovered)
}

fn from_file(
    path: &Path,
    field: &'static str,
    source: String,
) -> Result<Discovered, DiscoveryError> {
    let json = std::fs::read_to_string(path).map_err(|e| DiscoveryError {
        field,
        reason: format!("cannot read {}: {e}", path.display()),
    })?;
    let credential = Credential::from_json(&json).map_err(|e| DiscoveryError {
        field,
        reason: format!("{}: {e}", path.display()),
    })?;
    Ok(Discovered { credential, source })
}

/// Token endpoints get credentials: `https://`, or `http://` to a loopback stand-in.
fn check_url(url: &str, field: &'static str) -> Result<(), CredentialsError> {
    require_https(field, url).map_err(|_| {
        CredentialsError::TokenUri(format!(
            "`{field}` must be https:// (http:// only to a loopback address)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn external(source: Value) -> Value {
        serde_json::json!({
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k8s",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": "https://sts.googleapis.com/v1/token",
            "service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/push@proj.iam.gserviceaccount.com:generateAccessToken",
            "credential_source": source,
        })
    }

    #[test]
    fn external_account_files_parse_and_refuse_what_is_unsupported() {
        let value = external(serde_json::json!({"file": "/var/run/token"}));
        let Credential::ExternalAccount(account) =
            Credential::from_json(&value.to_string()).unwrap()
        else {
            panic!("not an external account");
        };
        assert!(
            matches!(&account.source, SubjectSource::File { path, format: SubjectFormat::Text } if path == Path::new("/var/run/token"))
        );
        assert_eq!(account.impersonation_lifetime_secs, 3600);
        let value = external(serde_json::json!({
            "url": "http://127.0.0.1:9/token", "headers": {"Metadata": "True"},
            "format": {"type": "json", "subject_token_field_name": "access_token"}
        }));
        let Credential::ExternalAccount(account) =
            Credential::from_json(&value.to_string()).unwrap()
        else {
            panic!("not an external account");
        };
        assert!(
            matches!(&account.source, SubjectSource::Url { format: SubjectFormat::Json(f), .. } if f == "access_token")
        );
        for (source, wanted) in [
            (
                serde_json::json!({"environment_id": "aws1"}),
                "regional_cred_verification_url",
            ),
            (
                serde_json::json!({"environment_id": "aws2", "regional_cred_verification_url": "https://sts.{region}.amazonaws.com"}),
                "aws1 is supported",
            ),
            (
                serde_json::json!({"executable": {"command": " "}}),
                "executable.command",
            ),
            (
                serde_json::json!({"executable": {"command": "x", "timeout_millis": 1000}}),
                "timeout_millis",
            ),
            (
                serde_json::json!({"file": "/t", "format": {"type": "json"}}),
                "subject_token_field_name",
            ),
            (
                serde_json::json!({"url": "http://10.0.0.1/t"}),
                "credential_source.url",
            ),
        ] {
            let err = Credential::from_json(&external(source).to_string())
                .unwrap_err()
                .to_string();
            assert!(err.contains(wanted), "{err}");
        }
        let mut value = external(serde_json::json!({"file": "/t"}));
        value["token_url"] = Value::from("http://sts.example.com/v1/token");
        let err = Credential::from_json(&value.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("token_url") && err.contains("https"), "{err}");
        value.as_object_mut().unwrap().remove("audience");
        assert_eq!(
            Credential::from_json(&value.to_string()).unwrap_err(),
            CredentialsError::Missing("audience")
        );
    }

    fn executable(command: &str, output_file: Option<&Path>) -> ExternalAccount {
        let mut source =
            serde_json::json!({"executable": {"command": command, "timeout_millis": 5000}});
        if let Some(path) = output_file {
            source["executable"]["output_file"] = Value::from(path.display().to_string());
        }
        match Credential::from_json(&external(source).to_string()).unwrap() {
            Credential::ExternalAccount(account) => account,
            other => panic!("{other:?}"),
        }
    }

    fn executable_source(account: &ExternalAccount) -> &Executable {
        match &account.source {
            SubjectSource::Executable(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn executable_responses_are_parsed_as_google_documents_them() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ok = |extra: &str| format!(r#"{{"version": 1, "success": true, {extra}}}"#);
        assert_eq!(
            parse_executable_response(
                &ok(r#""token_type": "urn:ietf:params:oauth:token-type:id_token", "id_token": "oidc", "expiration_time": 1800000600"#),
                now
            )
            .unwrap(),
            (
                "oidc".to_string(),
                Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_600))
            )
        );
        assert_eq!(
            parse_executable_response(
                &ok(r#""token_type": "urn:ietf:params:oauth:token-type:saml2", "saml_response": "saml""#),
                now
            )
            .unwrap(),
            ("saml".to_string(), None)
        );
        let expired = parse_executable_response(
            &ok(r#""token_type": "urn:ietf:params:oauth:token-type:jwt", "id_token": "t", "expiration_time": 1799999999"#),
            now,
        )
        .unwrap_err();
        assert!(
            matches!(&expired, FetchError::Transient(r) if r.contains("expired")),
            "{expired:?}"
        );
        for (text, wanted) in [
            (
                r#"{"version": 1, "success": false, "code": "401", "message": "no session"}"#
                    .to_string(),
                "no session",
            ),
            (
                r#"{"version": 2, "success": true}"#.to_string(),
                "version 2",
            ),
            (r#"{"success": true}"#.to_string(), "version"),
            (ok(r#""token_type": "urn:x""#), "urn:x"),
            (
                ok(r#""token_type": "urn:ietf:params:oauth:token-type:jwt""#),
                "id_token",
            ),
            ("not json".to_string(), "JSON"),
        ] {
            let error = parse_executable_response(&text, now).unwrap_err();
            assert!(
                matches!(&error, FetchError::Permanent(r) if r.contains(wanted)),
                "{text}: {error:?}"
            );
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn executables_run_with_googles_variables_and_their_response_is_kept_until_it_expires() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        let runs = dir.path().join("runs");
        let script = dir.path().join("token.sh");
        let expires = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho run >> {runs}\nprintf '%s|%s|%s|%s|%s|%s' \"$1\" \"$GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE\" \"$GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE\" \"$GOOGLE_EXTERNAL_ACCOUNT_INTERACTIVE\" \"$GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL\" \"$GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE\" > {seen}\nprintf '{{\"version\": 1, \"success\": true, \"token_type\": \"urn:ietf:params:oauth:token-type:jwt\", \"id_token\": \"subject-from-script\", \"expiration_time\": {expires}}}'\n",
                runs = runs.display(),
                seen = seen.display(),
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let output = dir.path().join("cache.json");
        let account = executable(&format!("{} --flag", script.display()), Some(&output));
        let http = CredentialHttp::new(None, Duration::from_secs(5)).unwrap();
        assert_eq!(
            account.subject_token(&http).await.unwrap(),
            "subject-from-script"
        );
        let seen = std::fs::read_to_string(&seen).unwrap();
        assert_eq!(
            seen,
            format!(
                "--flag|{}|urn:ietf:params:oauth:token-type:jwt|0|push@proj.iam.gserviceaccount.com|{}",
                account.audience,
                output.display()
            )
        );
        // Until its expiration_time the response is reused: the command does not run again.
        assert_eq!(
            account.subject_token(&http).await.unwrap(),
            "subject-from-script"
        );
        assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 1);
        // A fresh credential finds the response the executable cached in its output file.
        std::fs::write(
            &output,
            format!(r#"{{"version": 1, "success": true, "token_type": "urn:ietf:params:oauth:token-type:jwt", "id_token": "from-output-file", "expiration_time": {expires}}}"#),
        )
        .unwrap();
        let again = executable(&format!("{} --flag", script.display()), Some(&output));
        assert_eq!(
            again.subject_token(&http).await.unwrap(),
            "from-output-file"
        );
        assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 1);
        // An expired cached response is not used: the command runs.
        std::fs::write(
            &output,
            r#"{"version": 1, "success": true, "token_type": "urn:ietf:params:oauth:token-type:jwt", "id_token": "stale", "expiration_time": 1}"#,
        )
        .unwrap();
        let third = executable(&format!("{} --flag", script.display()), Some(&output));
        assert_eq!(
            third.subject_token(&http).await.unwrap(),
            "subject-from-script"
        );
        assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 2);
        assert!(
            executable_source(&third).cached.lock().is_some(),
            "kept until its expiration_time"
        );
        // A failing command is an error quoting its stderr.
        let failing = dir.path().join("fail.sh");
        std::fs::write(&failing, "#!/bin/sh\necho 'no session' >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = executable(&failing.display().to_string(), None)
            .subject_token(&http)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, FetchError::Transient(r) if r.contains("no session")),
            "{error:?}"
        );
    }

    /// Google's published AWS test credentials (temporary ones, with a session token).
    fn aws_test_credentials(token: bool) -> AwsCredentials {
        AwsCredentials {
            access_key_id: "ASIARD4OQDT6A77FR3CL".into(),
            secret_access_key: "Y8AfSaucF37G4PpvfguKZ3/l7Id4uocLXxX0+VTx".into(),
            session_token: token.then(|| "IQoJb3JpZ2luX2VjEIz//////////wEaCXVzLWVhc3QtMiJGMEQCIH7MHX/Oy/OB8OlLQa9GrqU1B914+iMikqWQW7vPCKlgAiA/Lsv8Jcafn14owfxXn95FURZNKaaphj0ykpmS+Ki+CSq0AwhlEAAaDDA3NzA3MTM5MTk5NiIMx9sAeP1ovlMTMKLjKpEDwuJQg41/QUKx0laTZYjPlQvjwSqS3OB9P1KAXPWSLkliVMMqaHqelvMF/WO/glv3KwuTfQsavRNs3v5pcSEm4SPO3l7mCs7KrQUHwGP0neZhIKxEXy+Ls//1C/Bqt53NL+LSbaGv6RPHaX82laz2qElphg95aVLdYgIFY6JWV5fzyjgnhz0DQmy62/Vi8pNcM2/VnxeCQ8CC8dRDSt52ry2v+nc77vstuI9xV5k8mPtnaPoJDRANh0bjwY5Sdwkbp+mGRUJBAQRlNgHUJusefXQgVKBCiyJY4w3Csd8Bgj9IyDV+Azuy1jQqfFZWgP68LSz5bURyIjlWDQunO82stZ0BgplKKAa/KJHBPCp8Qi6i99uy7qh76FQAqgVTsnDuU6fGpHDcsDSGoCls2HgZjZFPeOj8mmRhFk1Xqvkbjuz8V1cJk54d3gIJvQt8gD2D6yJQZecnuGWd5K2e2HohvCc8Fc9kBl1300nUJPV+k4tr/A5R/0QfEKOZL1/k5lf1g9CREnrM8LVkGxCgdYMxLQow1uTL+QU67AHRRSp5PhhGX4Rek+01vdYSnJCMaPhSEgcLqDlQkhk6MPsyT91QMXcWmyO+cAZwUPwnRamFepuP4K8k2KVXs/LIJHLELwAZ0ekyaS7CptgOqS7uaSTFG3U+vzFZLEnGvWQ7y9IPNQZ+Dffgh4p3vF4J68y9049sI6Sr5d5wbKkcbm8hdCDHZcv4lnqohquPirLiFQ3q7B17V9krMPu3mz1cg4Ekgcrn/E09NTsxAqD8NcZ7C7ECom9r+X3zkDOxaajW6hu3Az8hGlyylDaMiFfRbBJpTIlxp7jfa7CxikNgNtEKLH9iCzvuSg2vhA==".into()),
        }
    }

    /// 2020-08-11T06:55:22Z, the instant of the published signatures.
    fn aws_test_time() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_597_128_922)
    }

    const STS_URL: &str =
        "https://sts.us-east-2.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15";

    #[test]
    fn sigv4_signatures_match_the_published_test_vectors() {
        // The GetCallerIdentity vectors of Google's auth libraries (with and without a session
        // token), computed by AWS's algorithm.
        for (token, signed, signature) in [
            (
                true,
                "host;x-amz-date;x-amz-security-token",
                "73452984e4a880ffdc5c392355733ec3f5ba310d5e0609a89244440cadfe7a7a",
            ),
            (
                false,
                "host;x-amz-date",
                "d095ba304919cd0d5570ba8a3787884ee78b860f268ed040ba23831d55536d56",
            ),
        ] {
            let credentials = aws_test_credentials(token);
            let headers =
                sign_aws_request("POST", STS_URL, "us-east-2", &credentials, aws_test_time())
                    .unwrap();
            let header = |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(
                header("Authorization"),
                Some(
                    format!(
                        "AWS4-HMAC-SHA256 Credential=ASIARD4OQDT6A77FR3CL/20200811/us-east-2/sts/aws4_request, SignedHeaders={signed}, Signature={signature}"
                    )
                    .as_str()
                )
            );
            assert_eq!(header("host"), Some("sts.us-east-2.amazonaws.com"));
            assert_eq!(header("x-amz-date"), Some("20200811T065522Z"));
            assert_eq!(
                header("x-amz-security-token"),
                credentials.session_token.as_deref()
            );
        }
        assert!(
            sign_aws_request(
                "POST",
                "http://sts.example",
                "r",
                &aws_test_credentials(false),
                aws_test_time()
            )
            .is_err()
        );
    }

    /// The `%XX` of a URL-encoded text decoded.
    fn url_decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    fn aws_source(metadata: Option<&str>) -> AwsSource {
        AwsSource {
            region_url: metadata
                .map(|m| format!("{m}/latest/meta-data/placement/availability-zone")),
            url: metadata.map(|m| format!("{m}/latest/meta-data/iam/security-credentials")),
            verification_url:
                "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15"
                    .into(),
            imdsv2_session_token_url: metadata.map(|m| format!("{m}/latest/api/token")),
        }
    }

    #[tokio::test]
    async fn aws_subject_tokens_from_the_environment_are_the_signed_request_in_json() {
        let http = CredentialHttp::new(None, Duration::from_secs(5)).unwrap();
        let audience = "//iam.googleapis.com/projects/123456/locations/global/workloadIdentityPools/POOL_ID/providers/PROVIDER_ID";
        let given = AwsEnvironment {
            region: Some("us-east-2".into()),
            credentials: Some(aws_test_credentials(true)),
        };
        // No metadata URL at all: everything comes from the environment, nothing is fetched.
        let token = aws_subject_token(&aws_source(None), audience, &http, given, aws_test_time())
            .await
            .unwrap();
        assert!(
            !token.contains('{') && !token.contains(' '),
            "URL-encoded: {token}"
        );
        let request: Value = serde_json::from_str(&url_decode(&token)).unwrap();
        assert_eq!(request["url"], STS_URL);
        assert_eq!(request["method"], "POST");
        let headers: Vec<(String, String)> = request["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["key"].as_str().unwrap().to_string(),
                    h["value"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let mut expected = sign_aws_request(
            "POST",
            STS_URL,
            "us-east-2",
            &aws_test_credentials(true),
            aws_test_time(),
        )
        .unwrap();
        expected.push(("x-goog-cloud-target-resource".into(), audience.into()));
        assert_eq!(headers, expected);
        let error = aws_subject_token(
            &aws_source(None),
            audience,
            &http,
            AwsEnvironment::default(),
            aws_test_time(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&error, FetchError::Permanent(r) if r.contains("AWS_REGION")),
            "{error:?}"
        );
    }

    /// A stand-in of the EC2 instance metadata service (IMDSv2): every metadata request must
    /// carry the session token it handed out.
    async fn imds_stand_in() -> (String, std::sync::Arc<parking_lot::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = std::sync::Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let log = std::sync::Arc::clone(&log);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let head = String::from_utf8_lossy(&head).to_lowercase();
                    let line = head.lines().next().unwrap_or("").to_string();
                    log.lock().push(line.clone());
                    let authorized = head.contains("x-aws-ec2-metadata-token: imds-session");
                    let (status, body) = match line.split_whitespace().take(2).collect::<Vec<_>>()[..]
                    {
                        ["put", "/latest/api/token"]
                            if head.contains("x-aws-ec2-metadata-token-ttl-seconds: 300") =>
                        {
                            ("200 OK", "imds-session".to_string())
                        }
                        [_, _] if !authorized => ("401 Unauthorized", String::new()),
                        ["get", "/latest/meta-data/placement/availability-zone"] => {
                            ("200 OK", "us-east-2b".to_string())
                        }
                        ["get", "/latest/meta-data/iam/security-credentials"] => {
                            ("200 OK", "gcp-role".to_string())
                        }
                        ["get", "/latest/meta-data/iam/security-credentials/gcp-role"] => {
                            let c = aws_test_credentials(true);
                            (
                                "200 OK",
                                serde_json::json!({
                                    "AccessKeyId": c.access_key_id,
                                    "SecretAccessKey": c.secret_access_key,
                                    "Token": c.session_token,
                                })
                                .to_string(),
                            )
                        }
                        _ => ("404 Not Found", String::new()),
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        (format!("http://{addr}"), seen)
    }

    #[tokio::test]
    async fn aws_region_and_credentials_come_from_the_instance_metadata_with_imdsv2() {
        let (metadata, seen) = imds_stand_in().await;
        let http = CredentialHttp::new(None, Duration::from_secs(5)).unwrap();
        let token = aws_subject_token(
            &aws_source(Some(&metadata)),
            "//iam.googleapis.com/x",
            &http,
            AwsEnvironment::default(),
            aws_test_time(),
        )
        .await
        .unwrap();
        let request: Value = serde_json::from_str(&url_decode(&token)).unwrap();
        // The region from the zone `us-east-2b`, the signature from the role's credentials: the
        // published vector.
        assert_eq!(request["url"], STS_URL);
        let authorization = request["headers"][0]["value"].as_str().unwrap();
        assert!(
            authorization.ends_with(
                "Signature=73452984e4a880ffdc5c392355733ec3f5ba310d5e0609a89244440cadfe7a7a"
            ),
            "{authorization}"
        );
        assert_eq!(
            seen.lock().clone(),
            [
                "put /latest/api/token http/1.1",
                "get /latest/meta-data/placement/availability-zone http/1.1",
                "get /latest/meta-data/iam/security-credentials http/1.1",
                "get /latest/meta-data/iam/security-credentials/gcp-role http/1.1",
            ]
        );
    }

    #[test]
    fn executables_must_be_allowed_at_start() {
        let json =
            external(serde_json::json!({"executable": {"command": "/bin/true"}})).to_string();
        let error = discover(Some(&json), None, &no_env).unwrap_err();
        assert_eq!(error.field, "credentials_json");
        assert!(error.reason.contains(ALLOW_EXECUTABLES), "{error:?}");
        let allow = |name: &str| (name == ALLOW_EXECUTABLES).then(|| "1".to_string());
        assert!(discover(Some(&json), None, &allow).is_ok());
    }

    #[test]
    fn other_types_are_named() {
        let err = Credential::from_json(r#"{"type":"impersonated_service_account"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("impersonated_service_account"), "{err}");
        let user = Credential::from_json(
            r#"{"type":"authorized_user","client_id":"c.apps","client_secret":"s3cret","refresh_token":"1//r3fresh"}"#,
        )
        .unwrap();
        assert_eq!(user.kind(), "authorized_user");
        let text = format!("{user:?}");
        assert!(
            !text.contains("s3cret") && !text.contains("r3fresh"),
            "{text}"
        );
    }

    #[test]
    fn discovery_follows_the_adc_order() {
        let dir = tempfile::tempdir().unwrap();
        let sa = pushgate_mocks::keys::generate_service_account("p", "https://127.0.0.1:1/token");
        let env_file = dir.path().join("env.json");
        std::fs::write(&env_file, &sa.json).unwrap();
        let gcloud = dir.path().join("gcloud");
        std::fs::create_dir(&gcloud).unwrap();
        std::fs::write(
            gcloud.join("application_default_credentials.json"),
            external(serde_json::json!({"file": "/t"})).to_string(),
        )
        .unwrap();
        let env_path = env_file.display().to_string();
        let gcloud_path = gcloud.display().to_string();
        let full = |name: &str| match name {
            "GOOGLE_APPLICATION_CREDENTIALS" => Some(env_path.clone()),
            "CLOUDSDK_CONFIG" => Some(gcloud_path.clone()),
            "GCE_METADATA_HOST" => Some("127.0.0.1:9".into()),
            _ => None,
        };
        // Configured JSON wins over everything.
        let found = discover(Some(&sa.json), None, &full).unwrap();
        assert_eq!(found.source, "credentials_json");
        let found = discover(None, None, &full).unwrap();
        assert!(
            found.source.starts_with("GOOGLE_APPLICATION_CREDENTIALS"),
            "{}",
            found.source
        );
        assert_eq!(found.credential.kind(), "service_account");
        let no_var = |name: &str| match name {
            "GOOGLE_APPLICATION_CREDENTIALS" => None,
            other => full(other),
        };
        let found = discover(None, None, &no_var).unwrap();
        assert!(found.source.starts_with("gcloud"), "{}", found.source);
        assert_eq!(found.credential.kind(), "external_account");
        let metadata_only = |name: &str| match name {
            "GCE_METADATA_HOST" => Some("127.0.0.1:9".into()),
            _ => None,
        };
        let found = discover(None, None, &metadata_only).unwrap();
        assert!(matches!(&found.credential, Credential::Metadata(m) if m.host == "127.0.0.1:9"));
        let found = discover(None, None, &no_env).unwrap();
        assert!(
            matches!(&found.credential, Credential::Metadata(m) if m.host == DEFAULT_METADATA_HOST)
        );
        let missing = |name: &str| {
            (name == "GOOGLE_APPLICATION_CREDENTIALS").then(|| "/nonexistent/adc.json".to_string())
        };
        let err = discover(None, None, &missing).unwrap_err();
        assert!(
            err.reason.contains("GOOGLE_APPLICATION_CREDENTIALS")
                && err.reason.contains("/nonexistent/adc.json"),
            "{err:?}"
        );
    }

    #[test]
    fn rfc3339_times() {
        let t = parse_rfc3339("2026-12-03T16:00:00Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_796_313_600
        );
        let t = parse_rfc3339("1970-01-01T00:00:01.5Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            Duration::from_millis(1500)
        );
        for bad in [
            "2026-13-01T00:00:00Z",
            "2026-12-03 16:00:00",
            "2026-12-03T16:00:00+01:00",
            "x",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn impersonation_answers() {
        let now = parse_rfc3339("2026-12-03T15:00:00Z").unwrap();
        let (token, lifetime) = parse_impersonation_response(
            200,
            br#"{"accessToken":"ya29.imp","expireTime":"2026-12-03T16:00:00Z"}"#,
            now,
        )
        .unwrap();
        assert_eq!(token.secret(), "ya29.imp");
        assert_eq!(lifetime, Duration::from_secs(3600));
        let denied = br#"{"error":{"code":403,"message":"Permission 'iam.serviceAccounts.getAccessToken' denied","status":"PERMISSION_DENIED"}}"#;
        assert!(matches!(
            parse_impersonation_response(403, denied, now),
            Err(FetchError::Permanent(r)) if r.contains("PERMISSION_DENIED")
        ));
        assert!(matches!(
            parse_impersonation_response(503, b"", now),
            Err(FetchError::Transient(_))
        ));
        assert!(matches!(
            parse_impersonation_response(200, br#"{"accessToken":"x"}"#, now),
            Err(FetchError::Transient(_))
        ));
    }
}
