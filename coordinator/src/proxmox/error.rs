//! What can go wrong talking to Proxmox VE, classified so callers can decide to retry.

use std::{collections::BTreeMap, fmt, time::Duration};

/// The class of an API error, from the status and the message (reference §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// 500 with "does not exist": a missing VM is not a 404 in Proxmox.
    NotFound,
    /// "already exists".
    AlreadyExists,
    /// A lock held by someone else: "is locked", "got timeout", "cfs-lock". Retry.
    Locked,
    /// 401.
    Auth,
    /// 403.
    Permission,
    /// 400: a parameter failed validation; `errors` names it.
    Invalid,
    /// 501: unknown path or method, or a request the proxy refuses.
    NotImplemented,
    /// 595–599: a failed internal hop. Retry.
    Hop,
    /// Anything else.
    Other,
}

/// What went wrong with a Proxmox call.
#[derive(Debug, thiserror::Error)]
pub enum ProxmoxError {
    /// The server answered with an error.
    #[error("{method} {path}: HTTP {status}: {}", display_api(message, errors))]
    Api {
        method: String,
        path: String,
        status: u16,
        /// From `message`, else the reason phrase, else the body text.
        message: String,
        /// Per-parameter validation messages.
        errors: BTreeMap<String, String>,
        kind: ApiErrorKind,
    },
    /// No answer: connect, TLS or timeout.
    #[error("{method} {path}: no answer from the Proxmox host")]
    Transport {
        method: String,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    /// An answer that does not fit the API.
    #[error("{method} {path}: unexpected response: {detail}")]
    Decode {
        method: String,
        path: String,
        detail: String,
    },
    /// A task ended in failure; `exitstatus` is Proxmox's own text.
    #[error("task {upid} failed: {exitstatus}")]
    TaskFailed {
        upid: String,
        exitstatus: String,
        /// The last lines of the task log.
        log: Vec<String>,
    },
    /// A task did not end in time.
    #[error("task {upid} did not finish within {timeout:?}")]
    TaskTimeout { upid: String, timeout: Duration },
    /// A VM stayed locked.
    #[error("VM {vmid} is still locked ({lock}) after {timeout:?}")]
    StillLocked {
        vmid: u32,
        lock: String,
        timeout: Duration,
    },
    /// The host's certificate is not trusted by the spec's settings.
    #[error(
        "the Proxmox host's certificate is not trusted; it presented SHA-256 fingerprint {seen}. \
         Check it on the host (`pvenode cert info`), then set proxmox.fingerprint to it or \
         proxmox.ca_file to /etc/pve/pve-root-ca.pem"
    )]
    Untrusted { seen: String },
    /// Building the HTTP client failed.
    #[error("invalid Proxmox client settings: {0}")]
    Setup(String),
}

fn display_api(message: &str, errors: &BTreeMap<String, String>) -> String {
    let mut text = message.trim_end().to_owned();
    for (param, error) in errors {
        text.push_str(&format!("; parameter {param}: {}", error.trim_end()));
    }
    text
}

impl ProxmoxError {
    /// The API error class, if the server answered.
    pub fn kind(&self) -> Option<ApiErrorKind> {
        match self {
            Self::Api { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Whether the server says the object is gone (success for a delete).
    pub fn is_not_found(&self) -> bool {
        self.kind() == Some(ApiErrorKind::NotFound)
    }

    /// Whether a retry may succeed without changing the request.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Api { kind, status, .. } => {
                matches!(kind, ApiErrorKind::Locked | ApiErrorKind::Hop)
                    || (*status >= 500 && *kind == ApiErrorKind::Other)
            }
            _ => false,
        }
    }

    /// Whether the error proves the request was not carried out, so even a non-idempotent
    /// call (a clone, a start) may be sent again.
    pub fn proves_not_executed(&self) -> bool {
        match self {
            Self::Transport { source, .. } => source.is_connect(),
            Self::Api { kind, status, .. } => *kind == ApiErrorKind::Locked || *status == 595,
            _ => false,
        }
    }
}

/// Classifies an error response.
pub(super) fn classify(status: u16, message: &str) -> ApiErrorKind {
    let m = message.to_ascii_lowercase();
    match status {
        400 => ApiErrorKind::Invalid,
        401 => ApiErrorKind::Auth,
        403 => ApiErrorKind::Permission,
        501 => ApiErrorKind::NotImplemented,
        595..=599 => ApiErrorKind::Hop,
        _ if m.contains("does not exist") => ApiErrorKind::NotFound,
        _ if m.contains("already exists") => ApiErrorKind::AlreadyExists,
        _ if m.contains("is locked")
            || m.contains("got timeout")
            || m.contains("can't lock file")
            || m.contains("cfs-lock")
            || m.contains("got no worker upid") =>
        {
            ApiErrorKind::Locked
        }
        _ => ApiErrorKind::Other,
    }
}

/// A secret that never shows in `Debug` output.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place it is sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_reference() {
        assert_eq!(
            classify(
                500,
                "Configuration file 'nodes/pve/qemu-server/1.conf' does not exist"
            ),
            ApiErrorKind::NotFound
        );
        assert_eq!(classify(500, "VM is locked (clone)"), ApiErrorKind::Locked);
        assert_eq!(
            classify(
                500,
                "can't lock file '/var/lock/qemu-server/lock-123.conf' - got timeout"
            ),
            ApiErrorKind::Locked
        );
        assert_eq!(
            classify(500, "unable to create VM 123: config file already exists"),
            ApiErrorKind::AlreadyExists
        );
        assert_eq!(classify(596, ""), ApiErrorKind::Hop);
        assert_eq!(
            classify(400, "Parameter verification failed."),
            ApiErrorKind::Invalid
        );
        let err = ProxmoxError::Api {
            method: "POST".into(),
            path: "/nodes/pve/qemu/9000/clone".into(),
            status: 400,
            message: "Parameter verification failed.\n".into(),
            errors: [(
                "name".to_owned(),
                "invalid format - value does not look like a valid DNS name\n".to_owned(),
            )]
            .into(),
            kind: ApiErrorKind::Invalid,
        };
        assert!(
            err.to_string().contains("parameter name: invalid format"),
            "{err}"
        );
        assert!(!err.is_transient());
        assert!(!format!("{:?}", Secret::new("s3cr3t")).contains("s3cr3t"));
    }
}
