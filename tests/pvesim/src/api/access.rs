//! `GET`/`POST /access/ticket`: password login and ticket renewal.

use serde_json::json;

use super::{ApiError, Ctx, Endpoint, Reply};
use crate::schema::{self, BOOL, Param, Params, STR, Schema};

/// The login form's dummy GET.
pub(super) static TICKET_FORM: Endpoint = Endpoint {
    schema: Schema::fixed(&[]),
    handler: |_, _| Ok(Reply::Data(serde_json::Value::Null)),
};

pub(super) static TICKET: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        Param::req("username", schema::max_len(64)),
        Param::req("password", STR),
        Param::opt("realm", schema::max_len(32)),
        Param::opt("otp", STR),
        Param::opt("tfa-challenge", STR),
        Param::opt("new-format", BOOL),
        Param::opt("path", schema::max_len(64)).requires("privs"),
        Param::opt("privs", schema::max_len(64)).requires("path"),
    ]),
    handler: ticket,
};

fn ticket(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let mut username = params.str("username").unwrap_or_default().to_owned();
    if let Some(realm) = params.str("realm")
        && !username.contains('@')
    {
        username = format!("{username}@{realm}");
    }
    let password = params.str("password").unwrap_or_default();
    let credentials = &ctx.shared.credentials;
    if !credentials.login(&username, password) {
        return Err(ApiError::status(401, "authentication failure"));
    }
    let (ticket, csrf) = credentials.issue(&username);
    Ok(Reply::Data(json!({
        "username": username,
        "ticket": ticket,
        "CSRFPreventionToken": csrf,
        "cap": {
            "vms": {},
            "storage": {},
            "nodes": {},
            "access": {},
            "dc": {},
            "sdn": {},
            "mapping": {},
        },
    })))
}
