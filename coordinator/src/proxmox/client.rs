//! The one request function: authentication, encoding, the envelope, error decoding,
//! and retries of transient failures with bounded, jittered backoff.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tracing::{debug, warn};

use super::{
    ApiErrorKind, ProxmoxError, Secret,
    error::classify,
    tls::{self, Trust},
};

/// How the client authenticates.
#[derive(Debug, Clone)]
pub enum Auth {
    /// An API token: `USER@REALM!TOKENID` and its secret. Needs no CSRF token.
    Token { id: String, secret: Secret },
    /// A user and password, traded for a ticket and a CSRF token (valid 2 h).
    Password { username: String, password: Secret },
}

/// Retry policy for transient failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Delay before the first retry; doubles each time, with jitter.
    pub base_delay: Duration,
    /// No delay exceeds this.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 4 attempts over about 7 s: long enough for a clone's lock to clear, short enough to
    /// fail a stuck call quickly (reference §11).
    fn default() -> Self {
        Self {
            attempts: 4,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
        }
    }
}

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://HOST:8006`; `/api2/json` is appended.
    pub endpoint: String,
    pub auth: Auth,
    pub trust: Trust,
    pub retry: RetryPolicy,
    /// Deadline of one HTTP request.
    pub request_timeout: Duration,
    /// How often task status is polled at first (then backing off to 4× this).
    pub task_poll: Duration,
}

impl ClientConfig {
    /// Defaults for a real host.
    pub fn new(endpoint: impl Into<String>, auth: Auth, trust: Trust) -> Self {
        Self {
            endpoint: endpoint.into(),
            auth,
            trust,
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(60),
            task_poll: Duration::from_millis(500),
        }
    }
}

/// Whether a call may be repeated after a failure whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// GET, PUT config: repeating is harmless.
    Safe,
    /// Clone, start, delete: repeat only when the error proves nothing happened.
    Unsafe,
}

/// A form parameter list.
pub type Params<'a> = &'a [(&'a str, String)];

#[derive(Debug, Clone)]
struct Ticket {
    cookie: String,
    csrf: String,
}

/// A Proxmox VE API client.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    auth: Auth,
    retry: RetryPolicy,
    pub(super) task_poll: Duration,
    ticket: Arc<Mutex<Option<Ticket>>>,
    rejected_fingerprint: Arc<Mutex<Option<String>>>,
}

impl Client {
    /// Builds a client; no request is made.
    pub fn new(config: ClientConfig) -> Result<Self, ProxmoxError> {
        let (tls, rejected) = tls::client_config(&config.trust)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .http1_only()
            .connect_timeout(Duration::from_secs(10))
            .timeout(config.request_timeout)
            .build()
            .map_err(|e| ProxmoxError::Setup(e.to_string()))?;
        let endpoint = config.endpoint.trim_end_matches('/');
        Ok(Self {
            http,
            base: format!("{endpoint}/api2/json"),
            auth: config.auth,
            retry: config.retry,
            task_poll: config.task_poll,
            ticket: Arc::new(Mutex::new(None)),
            rejected_fingerprint: rejected,
        })
    }

    /// Calls `method path` with `params` (query string for GET and DELETE, form body for
    /// POST and PUT), retrying transient failures, and returns `data`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        params: Params<'_>,
        idempotency: Idempotency,
    ) -> Result<Value, ProxmoxError> {
        let mut attempt = 1;
        loop {
            match self.call_once(&method, path, params).await {
                Ok(value) => return Ok(value),
                Err(e) => {
                    let retry = attempt < self.retry.attempts
                        && e.is_transient()
                        && (idempotency == Idempotency::Safe || e.proves_not_executed());
                    if !retry {
                        return Err(e);
                    }
                    let delay = self.backoff(attempt);
                    warn!(%method, path, attempt, error = %e, ?delay, "transient Proxmox error; retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let step = self
            .retry
            .base_delay
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(self.retry.max_delay);
        step / 2 + (step / 2).mul_f64(rand::random::<f64>())
    }

    /// One attempt.
    async fn call_once(
        &self,
        method: &Method,
        path: &str,
        params: Params<'_>,
    ) -> Result<Value, ProxmoxError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method.clone(), &url);
        request = if *method == Method::GET || *method == Method::DELETE {
            request.query(params)
        } else {
            request.form(params)
        };
        request = self.authenticate(request, method).await?;
        self.send(method, path, request).await
    }

    /// Uploads `data` as `filename` to `storage` (`iso` content) and returns the `imgcopy`
    /// task. Multipart with a known Content-Length, as pveproxy requires.
    pub(super) async fn upload(
        &self,
        path: &str,
        content: &str,
        filename: &str,
        data: Vec<u8>,
    ) -> Result<Value, ProxmoxError> {
        let url = format!("{}{path}", self.base);
        let part = reqwest::multipart::Part::bytes(data)
            .file_name(filename.to_owned())
            .mime_str("application/octet-stream")
            .map_err(|e| ProxmoxError::Setup(e.to_string()))?;
        let form = reqwest::multipart::Form::new()
            .text("content", content.to_owned())
            .part("filename", part);
        let request = self.http.post(&url).multipart(form);
        // Uploads need no CSRF token even with a ticket.
        let request = self.authenticate(request, &Method::GET).await?;
        self.send(&Method::POST, path, request).await
    }

    async fn send(
        &self,
        method: &Method,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Value, ProxmoxError> {
        let response = request.send().await.map_err(|source| {
            if let Some(seen) = self.take_untrusted_fingerprint(&source) {
                return ProxmoxError::Untrusted { seen };
            }
            ProxmoxError::Transport {
                method: method.to_string(),
                path: path.to_owned(),
                source,
            }
        })?;
        let status = response.status();
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| status.canonical_reason().map(str::to_owned))
            .unwrap_or_default();
        let body = response
            .bytes()
            .await
            .map_err(|source| ProxmoxError::Transport {
                method: method.to_string(),
                path: path.to_owned(),
                source,
            })?;
        if status == StatusCode::UNAUTHORIZED {
            // A ticket may have expired: fetch a new one on the next call.
            *self.ticket.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        decode_response(method, path, status, &reason, &body)
    }

    /// The fingerprint of a certificate the verifier rejected, if that is why `error` happened.
    fn take_untrusted_fingerprint(&self, error: &reqwest::Error) -> Option<String> {
        if !error.is_connect() && !error.is_request() {
            return None;
        }
        self.rejected_fingerprint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    async fn authenticate(
        &self,
        request: reqwest::RequestBuilder,
        method: &Method,
    ) -> Result<reqwest::RequestBuilder, ProxmoxError> {
        match &self.auth {
            Auth::Token { id, secret } => Ok(request.header(
                reqwest::header::AUTHORIZATION,
                format!("PVEAPIToken={id}={}", secret.expose()),
            )),
            Auth::Password { username, password } => {
                let ticket = self.ticket(username, password).await?;
                let request = request.header(
                    reqwest::header::COOKIE,
                    format!("PVEAuthCookie={}", ticket.cookie),
                );
                Ok(if *method == Method::GET {
                    request
                } else {
                    request.header("CSRFPreventionToken", ticket.csrf)
                })
            }
        }
    }

    async fn ticket(&self, username: &str, password: &Secret) -> Result<Ticket, ProxmoxError> {
        if let Some(ticket) = self
            .ticket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(ticket);
        }
        let url = format!("{}/access/ticket", self.base);
        let params = [("username", username), ("password", password.expose())];
        let request = self.http.post(&url).form(&params);
        let data = self.send(&Method::POST, "/access/ticket", request).await?;
        let field = |name: &str| {
            data.get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| ProxmoxError::Decode {
                    method: "POST".into(),
                    path: "/access/ticket".into(),
                    detail: format!("no {name} in the answer"),
                })
        };
        let ticket = Ticket {
            cookie: field("ticket")?,
            csrf: field("CSRFPreventionToken")?,
        };
        *self.ticket.lock().unwrap_or_else(|e| e.into_inner()) = Some(ticket.clone());
        Ok(ticket)
    }
}

/// Reads a Proxmox answer: the `data` of a `{"data": …}` envelope on success, the error
/// either shape carries (`message` and per-parameter `errors`, else the reason phrase, else
/// the body) on failure. Pure, so it takes any bytes (the fuzz target `proxmox_response`
/// feeds it arbitrary ones).
pub fn decode_response(
    method: &Method,
    path: &str,
    status: StatusCode,
    reason: &str,
    body: &[u8],
) -> Result<Value, ProxmoxError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if !status.is_success() {
        let message = json
            .as_ref()
            .and_then(|j| j.get("message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .filter(|m| !m.trim().is_empty())
            .or_else(|| Some(reason.to_owned()).filter(|r| !r.is_empty()))
            .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
        let errors: BTreeMap<String, String> = json
            .as_ref()
            .and_then(|j| j.get("errors"))
            .and_then(Value::as_object)
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                        (k.clone(), text.trim_end().to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let kind = classify(status.as_u16(), &message);
        debug!(%method, path, status = status.as_u16(), message, "Proxmox error");
        return Err(ProxmoxError::Api {
            method: method.to_string(),
            path: path.to_owned(),
            status: status.as_u16(),
            message: message.trim_end().to_owned(),
            errors,
            kind,
        });
    }
    let json = json.ok_or_else(|| ProxmoxError::Decode {
        method: method.to_string(),
        path: path.to_owned(),
        detail: "the body is not JSON".into(),
    })?;
    match json {
        Value::Object(mut o) => Ok(o.remove("data").unwrap_or(Value::Null)),
        _ => Err(ProxmoxError::Decode {
            method: method.to_string(),
            path: path.to_owned(),
            detail: "the body is not a {\"data\": …} envelope".into(),
        }),
    }
}

/// Percent-encodes one path segment (a UPID, a volume id).
pub fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl ApiErrorKind {
    /// Whether this is a validation error.
    pub fn is_invalid(self) -> bool {
        self == Self::Invalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(status: u16, reason: &str, body: &str) -> Result<Value, ProxmoxError> {
        decode_response(
            &Method::GET,
            "/test",
            StatusCode::from_u16(status).unwrap(),
            reason,
            body.as_bytes(),
        )
    }

    #[test]
    fn success_takes_data_out_of_the_envelope() {
        assert_eq!(decode(200, "OK", r#"{"data":"102"}"#).unwrap(), "102");
        assert_eq!(decode(200, "OK", r#"{}"#).unwrap(), Value::Null);
    }

    #[test]
    fn a_success_that_is_not_an_envelope_is_a_decode_error() {
        for body in ["", "<html></html>", "[1,2]", "\"text\"", "{\"data\":"] {
            let err = decode(200, "OK", body).unwrap_err();
            assert!(
                matches!(err, ProxmoxError::Decode { .. }),
                "{body:?}: {err:?}"
            );
        }
    }

    #[test]
    fn errors_take_the_message_then_the_reason_then_the_body() {
        let with_message = decode(
            500,
            "",
            r#"{"data":null,"message":"VM 101 is locked (clone)\n"}"#,
        );
        let Err(ProxmoxError::Api { message, kind, .. }) = with_message else {
            panic!("{with_message:?}");
        };
        assert_eq!(message, "VM 101 is locked (clone)");
        assert_eq!(kind, ApiErrorKind::Locked);

        let Err(ProxmoxError::Api {
            message, errors, ..
        }) = decode(
            400,
            "Parameter verification failed.",
            r#"{"data":null,"errors":{"vmid":"value must be at least 100\n","n":1}}"#,
        )
        else {
            panic!("a 400 is an API error");
        };
        assert_eq!(message, "Parameter verification failed.");
        assert_eq!(errors["vmid"], "value must be at least 100");
        assert_eq!(errors["n"], "1");

        let Err(ProxmoxError::Api { message, .. }) = decode(502, "", " <h1>Bad Gateway</h1>\n")
        else {
            panic!("a 502 is an API error");
        };
        assert_eq!(message, "<h1>Bad Gateway</h1>");
    }
}
