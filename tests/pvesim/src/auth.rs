//! Who is calling: API tokens, tickets and CSRF tokens, checked the way pveproxy does.
//!
//! Precedence follows the server: the `PVEAuthCookie` cookie, then `PVEAuthCookie=` in the
//! `Authorization` header, then `PVEAPIToken=USER@REALM!TOKENID=SECRET` (split at the last
//! `=`). Tickets are `PVE:<user>:<HEXTIME>::<signature>` and live two hours; every non-GET
//! ticket request except an upload needs a matching `CSRFPreventionToken` header.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::HeaderMap;
use percent_encoding::percent_decode_str;
use sha2::{Digest, Sha256};

use crate::config::Acl;
use crate::state::{Principal, epoch_now};

/// How long a ticket is valid.
const TICKET_LIFETIME_SECS: u64 = 2 * 60 * 60;

/// Why a request was refused before any handler ran. The message is the reason phrase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    /// No credentials at all.
    #[error("No ticket")]
    NoTicket,
    /// Unknown token, wrong secret, bad or expired ticket.
    #[error("Authentication failed!")]
    Failed,
    /// A ticket request without a valid CSRF token.
    #[error("Permission denied - invalid csrf token")]
    Csrf,
    /// An API token on an endpoint that needs a ticket.
    #[error(
        "Permission check failed (URI '{path}' not available with API token, need proper ticket.)"
    )]
    TokenNotAllowed { path: String },
}

impl AuthError {
    pub(crate) fn status(&self) -> u16 {
        match self {
            Self::TokenNotAllowed { .. } => 403,
            _ => 401,
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) principal: Principal,
    pub(crate) acl: Acl,
}

/// The credential material the simulator checks against.
pub(crate) struct Credentials {
    pub(crate) tokens: Vec<crate::config::TokenSpec>,
    pub(crate) users: Vec<crate::config::UserSpec>,
    pub(crate) key: [u8; 32],
}

impl Credentials {
    /// Authenticates a request. `Ok(None)` means the endpoint needs no login
    /// (`/access/ticket`).
    pub(crate) fn authenticate(
        &self,
        headers: &HeaderMap,
        method: &str,
        path: &str,
        upload: bool,
    ) -> Result<Option<Caller>, AuthError> {
        let header = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let cookie = header("cookie");
        let authorization = header("authorization");
        let ticket =
            extract(&cookie, "PVEAuthCookie").or_else(|| extract(&authorization, "PVEAuthCookie"));
        let token = if ticket.is_none() {
            extract(&authorization, "PVEAPIToken")
        } else {
            None
        };

        if path == "/access/ticket" {
            return match token {
                Some(_) => Err(AuthError::TokenNotAllowed {
                    path: path.to_owned(),
                }),
                None => Ok(None),
            };
        }

        if let Some(ticket) = ticket {
            let userid = self.verify_ticket(&ticket).ok_or(AuthError::Failed)?;
            if method != "GET" && !upload {
                let csrf = headers
                    .get("csrfpreventiontoken")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !self.verify_csrf(csrf, &userid) {
                    return Err(AuthError::Csrf);
                }
            }
            return Ok(Some(Caller {
                principal: Principal {
                    userid,
                    tokenid: None,
                },
                acl: Acl::All,
            }));
        }

        let Some(token) = token else {
            return Err(AuthError::NoTicket);
        };
        let (full_id, secret) = token.rsplit_once('=').ok_or(AuthError::Failed)?;
        let spec = self
            .tokens
            .iter()
            .find(|t| t.token_id == full_id && t.secret.expose() == secret)
            .ok_or(AuthError::Failed)?;
        let (userid, tokenid) = full_id.split_once('!').ok_or(AuthError::Failed)?;
        Ok(Some(Caller {
            principal: Principal {
                userid: userid.to_owned(),
                tokenid: Some(tokenid.to_owned()),
            },
            acl: spec.acl.clone(),
        }))
    }

    fn sign(&self, data: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.key);
        hasher.update(data.as_bytes());
        BASE64.encode(hasher.finalize())
    }

    /// A new ticket and CSRF token for `userid`.
    pub(crate) fn issue(&self, userid: &str) -> (String, String) {
        let time = format!("{:08X}", epoch_now());
        let plain = format!("PVE:{userid}:{time}");
        let ticket = format!("{plain}::{}", self.sign(&plain));
        let csrf = format!("{time}:{}", self.sign(&format!("csrf:{time}:{userid}")));
        (ticket, csrf)
    }

    /// The user of a valid, unexpired ticket.
    pub(crate) fn verify_ticket(&self, ticket: &str) -> Option<String> {
        let (plain, signature) = ticket.split_once("::")?;
        if self.sign(plain) != signature {
            return None;
        }
        let rest = plain.strip_prefix("PVE:")?;
        let (userid, time) = rest.rsplit_once(':')?;
        let time = u64::from_str_radix(time, 16).ok()?;
        let now = epoch_now();
        (time <= now + 300 && now.saturating_sub(time) < TICKET_LIFETIME_SECS)
            .then(|| userid.to_owned())
    }

    fn verify_csrf(&self, token: &str, userid: &str) -> bool {
        token.split_once(':').is_some_and(|(time, signature)| {
            self.sign(&format!("csrf:{time}:{userid}")) == signature
        })
    }

    /// Checks a login; the password may also be a valid ticket of the same user (renewal).
    pub(crate) fn login(&self, username: &str, password: &str) -> bool {
        if self.verify_ticket(password).as_deref() == Some(username) {
            return true;
        }
        self.users
            .iter()
            .any(|u| u.userid == username && u.password.expose() == password)
    }
}

/// `PVE::APIServer::Formatter::extract_auth_value`: the URI-unescaped value after
/// `NAME=` (or `NAME `) at the start of the header or after whitespace, up to `;`.
fn extract(header: &str, name: &str) -> Option<String> {
    let mut search = 0;
    while let Some(found) = header[search..].find(name) {
        let start = search + found;
        let at_boundary = start == 0
            || header[..start]
                .chars()
                .next_back()
                .is_some_and(char::is_whitespace);
        let after = &header[start + name.len()..];
        if at_boundary && (after.starts_with('=') || after.starts_with(' ')) {
            let value = after[1..].split(';').next().unwrap_or_default();
            return Some(percent_decode_str(value).decode_utf8_lossy().into_owned());
        }
        search = start + name.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, TokenSpec, UserSpec};

    fn creds() -> Credentials {
        Credentials {
            tokens: vec![TokenSpec::new("coord@pve!prov", "s3cr=t")],
            users: vec![UserSpec {
                userid: "root@pam".into(),
                password: Secret::new("pw"),
            }],
            key: [7; 32],
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn token_splits_at_the_last_equals_sign() {
        let caller = creds()
            .authenticate(
                &headers(&[("authorization", "PVEAPIToken=coord@pve!prov=s3cr=t")]),
                "POST",
                "/nodes/pve/qemu/9000/clone",
                false,
            )
            .unwrap_err();
        // `s3cr=t` splits into id `coord@pve!prov=s3cr` and secret `t`: a failure, like PVE.
        assert_eq!(caller, AuthError::Failed);
        let mut c = creds();
        c.tokens = vec![TokenSpec::new("coord@pve!prov", "secret")];
        let ok = c
            .authenticate(
                &headers(&[("authorization", "PVEAPIToken=coord@pve!prov=secret")]),
                "POST",
                "/x",
                false,
            )
            .unwrap()
            .unwrap();
        assert_eq!(ok.principal.upid_user(), "coord@pve!prov");
    }

    #[test]
    fn tickets_need_csrf_on_writes_but_not_on_uploads() {
        let c = creds();
        let (ticket, csrf) = c.issue("root@pam");
        let cookie = format!("PVEAuthCookie={ticket}");
        assert_eq!(
            c.authenticate(&headers(&[("cookie", &cookie)]), "PUT", "/x", false)
                .unwrap_err(),
            AuthError::Csrf
        );
        assert!(
            c.authenticate(&headers(&[("cookie", &cookie)]), "POST", "/x", true)
                .is_ok()
        );
        assert!(
            c.authenticate(
                &headers(&[("cookie", &cookie), ("csrfpreventiontoken", &csrf)]),
                "PUT",
                "/x",
                false
            )
            .is_ok()
        );
        assert_eq!(
            c.authenticate(&HeaderMap::new(), "GET", "/x", false)
                .unwrap_err(),
            AuthError::NoTicket
        );
    }
}
