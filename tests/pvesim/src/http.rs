//! The pveproxy layer: HTTP checks, authentication, parameter extraction, fault injection,
//! and the response envelope.
//!
//! Order of checks, as pveproxy does them: method, transfer encoding, path, authentication
//! (401/403, delayed), body rules (501/506), then the handler. Responses carry the first line
//! of their message as the reason phrase; handler errors add a JSON body, HTTP-layer errors a
//! plain-text body (empty with `legacy_errors`), pre-handler auth errors nothing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::ext::ReasonPhrase;
use percent_encoding::percent_decode_str;
use serde_json::{Map, Value, json};
use tokio::time::sleep;
use tracing::{debug, warn};

use crate::api::{self, ApiError, Ctx, Reply, UploadedFile};
use crate::auth::Caller;
use crate::config::Acl;
use crate::multipart;
use crate::observe::RequestRecord;
use crate::schema::RawValue;
use crate::server::Shared;
use crate::state::TaskEnd;

pub(crate) type Body = Full<Bytes>;

/// Which envelope the client asked for (`/api2/json` or `/api2/extjs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    ExtJs,
}

/// What to send back, before it is put into a format.
#[derive(Debug)]
enum Outcome {
    /// `{"data": …}` plus `total` when non-zero.
    Success { data: Value, total: u64 },
    /// A handler error.
    Handler(ApiError),
    /// An error raised by the HTTP server itself.
    HttpLayer { status: u16, message: String },
    /// An authentication failure: reason phrase only.
    PreHandler { status: u16, message: String },
    /// A failed proxy hop (59x): reason phrase only.
    Hop { status: u16, message: String },
}

impl Outcome {
    fn http(status: u16, message: impl Into<String>) -> Self {
        Self::HttpLayer {
            status,
            message: message.into(),
        }
    }
}

/// Serves one request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut record = RequestRecord {
        method: req.method().as_str().to_owned(),
        path: percent_decode_str(req.uri().path())
            .decode_utf8_lossy()
            .into_owned(),
        query: parse_urlencoded(req.uri().query().unwrap_or_default()),
        params: BTreeMap::new(),
        status: 0,
        user: None,
    };
    let (outcome, format) = process(&shared, req, &mut record).await;
    if record.method != "GET"
        && let Err(err) = shared.persist()
    {
        warn!(error = %err, "failed to write the state file");
    }
    let response = render(outcome, format, shared.legacy_errors());
    record.status = response.status().as_u16();
    debug!(
        method = %record.method,
        path = %record.path,
        status = record.status,
        "request"
    );
    shared.push_record(record);
    Ok(response)
}

/// `(format, path below it)` for `/api2/<format>/<path>`.
fn split_api_path(path: &str) -> Option<(&str, String)> {
    let rest = path.strip_prefix("/api2/")?.trim_start_matches('/');
    let (format, rel) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let b = format.as_bytes();
    let valid = !b.is_empty()
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    valid.then(|| (format, rel.to_owned()))
}

async fn process(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    record: &mut RequestRecord,
) -> (Outcome, Format) {
    let mut format = Format::Json;
    let method = record.method.clone();
    if !matches!(method.as_str(), "GET" | "POST" | "PUT" | "DELETE") {
        return (
            Outcome::http(501, format!("method '{method}' not available")),
            format,
        );
    }
    if let Some(te) = req.headers().get(header::TRANSFER_ENCODING) {
        let te = te.to_str().unwrap_or_default();
        let message = if te.eq_ignore_ascii_case("chunked") {
            "chunked transfer encoding not supported".to_owned()
        } else {
            format!("Unknown transfer encoding '{te}'")
        };
        drain(req).await;
        return (Outcome::http(501, message), format);
    }
    if !record.path.starts_with("/api2") {
        let message = format!("no such file '{}'", record.path);
        return (Outcome::http(501, message), format);
    }
    let Some((fmt_name, rel)) = split_api_path(&record.path) else {
        return (Outcome::http(501, "no such uri"), format);
    };
    format = match fmt_name {
        "json" => Format::Json,
        "extjs" => Format::ExtJs,
        other => {
            let message = format!("no formatter for uri {rel}, {other}");
            return (Outcome::http(501, message), format);
        }
    };
    record.path.clone_from(&rel);

    // Authentication.
    let upload = api::is_upload(&method, &rel);
    let caller = match shared
        .credentials
        .authenticate(req.headers(), &method, &rel, upload)
    {
        Ok(caller) => caller,
        Err(err) => {
            drain(req).await;
            let delay = shared.with_state(|s| s.knobs.timing.auth_failure_delay);
            sleep(delay).await;
            let outcome = Outcome::PreHandler {
                status: err.status(),
                message: err.to_string(),
            };
            return (outcome, format);
        }
    };
    record.user = caller.as_ref().map(|c| c.principal.upid_user());

    // Body rules and parameters.
    let (raw, upload_file) = match read_params(shared, req, &method, upload, record).await {
        Ok(parsed) => parsed,
        Err(outcome) => return (outcome, format),
    };

    // Injected request faults.
    if let Some(rule) = shared.with_state(|s| s.faults.take_request_fault(&method, &rel)) {
        sleep(rule.delay).await;
        let outcome = if rule.status >= 590 {
            Outcome::Hop {
                status: rule.status,
                message: rule.message,
            }
        } else {
            Outcome::Handler(ApiError::status(rule.status, rule.message))
        };
        return (outcome, format);
    }

    let outcome = match run_handler(shared, caller, &method, &rel, raw, upload_file) {
        Ok(Reply::Data(data)) => Outcome::Success { data, total: 0 },
        Ok(Reply::Total(data, total)) => Outcome::Success { data, total },
        Ok(Reply::Await { upid, wait }) => await_task(shared, upid, wait).await,
        Err(err) => {
            if err.status == 401 {
                // pveproxy delays every 401, handler ones (a failed login) included.
                let delay = shared.with_state(|s| s.knobs.timing.auth_failure_delay);
                sleep(delay).await;
            }
            Outcome::Handler(err)
        }
    };
    (outcome, format)
}

fn run_handler(
    shared: &Shared,
    caller: Option<Caller>,
    method: &str,
    rel: &str,
    raw: BTreeMap<String, RawValue>,
    upload: Option<UploadedFile>,
) -> Result<Reply, ApiError> {
    let now = shared.now();
    let mut state = shared.lock_state();
    state.advance(now);
    let all = Acl::All;
    let mut ctx = Ctx {
        state: &mut state,
        shared,
        now,
        who: caller.as_ref().map(|c| &c.principal),
        acl: caller.as_ref().map_or(&all, |c| &c.acl),
        upload,
    };
    api::dispatch(&mut ctx, method, rel, raw)
}

/// `background_delay` / `delay`: wait for the task up to `wait`.
async fn await_task(shared: &Shared, upid: String, wait: std::time::Duration) -> Outcome {
    let started = shared.now();
    let due = shared.with_state(|s| s.tasks.iter().find(|t| t.upid == upid).map(|t| t.due));
    let Some(due) = due else {
        return Outcome::Success {
            data: json!(upid),
            total: 0,
        };
    };
    let deadline = started + wait;
    sleep(due.min(deadline).saturating_duration_since(started)).await;
    let end = shared.with_state(|s| {
        s.tasks
            .iter()
            .find(|t| t.upid == upid && t.finished)
            .map(|t| t.end.clone())
    });
    match end {
        Some(TaskEnd::Error(msg)) => Outcome::Handler(ApiError::die(msg)),
        Some(_) => Outcome::Success {
            data: Value::Null,
            total: 0,
        },
        None => Outcome::Success {
            data: json!(upid),
            total: 0,
        },
    }
}

type Parsed = (BTreeMap<String, RawValue>, Option<UploadedFile>);

/// Applies pveproxy's body rules and returns the merged parameters.
async fn read_params(
    shared: &Shared,
    req: Request<Incoming>,
    method: &str,
    upload: bool,
    record: &mut RequestRecord,
) -> Result<Parsed, Outcome> {
    let length: u64 = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let query = record.query.clone();
    let mut raw: BTreeMap<String, RawValue> = BTreeMap::new();
    let mut upload_file = None;

    if length > 0 {
        if !matches!(method, "PUT" | "POST") {
            drain(req).await;
            return Err(Outcome::http(
                501,
                format!("Unexpected content for method '{method}'"),
            ));
        }
        let ct_text = content_type.clone().unwrap_or_default();
        let ct = ct_text
            .split([';', ','])
            .next()
            .map(|s| s.trim().to_ascii_lowercase());
        if upload {
            let Some(boundary) = multipart::boundary(&ct_text) else {
                drain(req).await;
                return Err(Outcome::http(
                    506,
                    format!("upload 'Content-Type '{ct_text}' not implemented"),
                ));
            };
            if length > shared.max_upload_bytes as u64 {
                drain(req).await;
                return Err(Outcome::http(501, "for data too large"));
            }
            let body = collect(req, shared.max_upload_bytes).await?;
            let parsed = multipart::parse(&body, &boundary).map_err(|err| {
                debug!(%err, "upload rejected");
                Outcome::http(501, "upload failed")
            })?;
            for (k, v) in &query {
                raw.insert(k.clone(), RawValue::Text(v.clone()));
            }
            for (k, v) in parsed.fields {
                raw.insert(k, RawValue::Text(v));
            }
            raw.insert("filename".into(), RawValue::Text(parsed.filename));
            record
                .params
                .insert("file-size".into(), parsed.data.len().to_string());
            upload_file = Some(UploadedFile { data: parsed.data });
        } else {
            if length > shared.max_body_bytes as u64 {
                drain(req).await;
                return Err(Outcome::http(501, "for data too large"));
            }
            match ct.as_deref() {
                None | Some("application/x-www-form-urlencoded") | Some("application/json") => {}
                Some(_) => {
                    drain(req).await;
                    return Err(Outcome::http(
                        506,
                        format!("upload 'Content-Type '{ct_text}' not implemented"),
                    ));
                }
            }
            let body = collect(req, shared.max_body_bytes).await?;
            if ct.as_deref() == Some("application/json") {
                let value: Value = serde_json::from_slice(&body)
                    .map_err(|err| Outcome::http(501, format!("malformed JSON string: {err}")))?;
                let Value::Object(map) = value else {
                    return Err(Outcome::http(501, "Not a HASH reference"));
                };
                for (k, v) in map {
                    raw.insert(k, RawValue::Json(v));
                }
            } else {
                let text = String::from_utf8_lossy(&body);
                for (k, v) in join_repeats(parse_urlencoded(&text)) {
                    raw.insert(k, RawValue::Text(v));
                }
            }
            for (k, v) in join_repeats(query) {
                raw.insert(k, RawValue::Text(v));
            }
        }
    } else {
        for (k, v) in join_repeats(query) {
            raw.insert(k, RawValue::Text(v));
        }
    }

    for (k, v) in &raw {
        let shown = match v {
            _ if matches!(k.as_str(), "password" | "cipassword") => "**********".to_owned(),
            RawValue::Text(s) => s.clone(),
            RawValue::Json(Value::String(s)) => s.clone(),
            RawValue::Json(other) => other.to_string(),
        };
        record.params.insert(k.clone(), shown);
    }
    Ok((raw, upload_file))
}

/// Reads and drops a rejected request's body (bounded), so the client gets to read the
/// response instead of a connection reset.
async fn drain(req: Request<Incoming>) {
    const DRAIN_LIMIT: usize = 4 * 1024 * 1024;
    let read = Limited::new(req.into_body(), DRAIN_LIMIT).collect();
    if tokio::time::timeout(std::time::Duration::from_secs(2), read)
        .await
        .is_err()
    {
        debug!("gave up draining a rejected request body");
    }
}

async fn collect(req: Request<Incoming>, limit: usize) -> Result<Bytes, Outcome> {
    Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|err| {
            debug!(%err, "request body unreadable");
            Outcome::http(501, "for data too large")
        })
}

/// `decode_urlencoded`: `&` or `;` separated, `+` is a space, `%XX` escapes; keys without a
/// value are dropped.
pub(crate) fn parse_urlencoded(text: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let spaced = s.replace('+', " ");
        percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
    };
    text.split(['&', ';'])
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((decode(k), decode(v)))
        })
        .collect()
}

/// A repeated form key becomes one value joined by NUL, as `decode_urlencoded` does.
fn join_repeats(pairs: Vec<(String, String)>) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in pairs {
        out.entry(k)
            .and_modify(|old| {
                old.push('\0');
                old.push_str(&v);
            })
            .or_insert(v);
    }
    out
}

/// The first line of a message, made safe for a status line.
fn reason_phrase(message: &str) -> Option<ReasonPhrase> {
    let line = message.lines().next().unwrap_or_default().trim_end();
    let cleaned: Vec<u8> = line
        .bytes()
        .map(|b| {
            if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 {
                b
            } else {
                b' '
            }
        })
        .collect();
    if cleaned.is_empty() {
        return None;
    }
    ReasonPhrase::try_from(cleaned).ok()
}

fn render(outcome: Outcome, format: Format, legacy: bool) -> Response<Body> {
    let (status, reason, body, json_body) = match outcome {
        Outcome::Success { data, total } => {
            let mut env = Map::new();
            env.insert("data".into(), data);
            if total != 0 {
                env.insert("total".into(), json!(total));
            }
            if format == Format::ExtJs {
                env.insert("success".into(), json!(1));
            }
            (200, None, Value::Object(env).to_string(), true)
        }
        Outcome::Handler(err) => {
            let mut env = Map::new();
            env.insert("data".into(), Value::Null);
            let has_errors = !err.errors.is_empty();
            if has_errors {
                env.insert("errors".into(), json!(err.errors));
            }
            if format == Format::ExtJs {
                env.insert("success".into(), json!(0));
                env.insert("status".into(), json!(err.status));
                env.insert("message".into(), json!(err.message));
                (200, None, Value::Object(env).to_string(), true)
            } else {
                if !legacy {
                    env.insert("message".into(), json!(err.message));
                }
                (
                    err.status,
                    reason_phrase(&err.message),
                    Value::Object(env).to_string(),
                    true,
                )
            }
        }
        Outcome::HttpLayer { status, message } => {
            let body = if legacy {
                String::new()
            } else {
                message.clone()
            };
            (status, reason_phrase(&message), body, false)
        }
        Outcome::PreHandler { status, message } | Outcome::Hop { status, message } => {
            (status, reason_phrase(&message), String::new(), false)
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(reason) = reason {
        response.extensions_mut().insert(reason);
    }
    let headers = response.headers_mut();
    headers.insert(
        header::SERVER,
        HeaderValue::from_static("pve-api-daemon/3.0"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=0"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if json_body {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=UTF-8"),
        );
    }
    if status >= 400 {
        // pveproxy closes the connection after every error.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths_split_into_format_and_rest() {
        assert_eq!(
            split_api_path("/api2/json/nodes/pve/qemu"),
            Some(("json", "/nodes/pve/qemu".to_owned()))
        );
        assert_eq!(split_api_path("/api2/json"), Some(("json", "/".to_owned())));
        assert_eq!(split_api_path("/api2/"), None);
        assert_eq!(split_api_path("/api2/JSON/x"), None);
    }

    #[test]
    fn forms_decode_like_perl() {
        let pairs = parse_urlencoded("a=1+2&b=%2520&c&d=x;e=%C3%A9");
        assert_eq!(
            pairs,
            vec![
                ("a".into(), "1 2".into()),
                ("b".into(), "%20".into()),
                ("d".into(), "x".into()),
                ("e".into(), "é".into()),
            ]
        );
        let joined = join_repeats(vec![("k".into(), "1".into()), ("k".into(), "2".into())]);
        assert_eq!(joined["k"], "1\u{0}2");
    }

    #[test]
    fn reason_phrases_are_the_first_line() {
        let reason = reason_phrase("Parameter verification failed.\nmore").unwrap();
        assert_eq!(reason.as_bytes(), b"Parameter verification failed.");
        assert!(reason_phrase("").is_none());
    }
}
