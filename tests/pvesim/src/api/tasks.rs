//! `GET /nodes/{node}/tasks/{upid}/status` and `…/log`.
//!
//! Task data is node-local on PVE: asking a different node than the UPID's gives
//! `no such task`, as does an unknown UPID; a malformed one gives `unable to parse worker upid`.

use serde_json::{Map, Value, json};

use super::{ApiError, Ctx, Endpoint, Reply};
use crate::schema::{BOOL, NODE, Param, Params, STR, Schema, UINT};
use crate::state::Task;

pub(super) fn route(method: &str, what: &str) -> Option<&'static Endpoint> {
    match (method, what) {
        ("GET", "status") => Some(&STATUS),
        ("GET", "log") => Some(&LOG),
        _ => None,
    }
}

static STATUS: Endpoint = Endpoint {
    schema: Schema::fixed(&[Param::req("node", NODE), Param::req("upid", STR)]),
    handler: status,
};

static LOG: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        Param::req("node", NODE),
        Param::req("upid", STR),
        Param::opt("start", UINT),
        Param::opt("limit", UINT),
        Param::opt("download", BOOL),
    ]),
    handler: log,
};

/// Whether `upid` has the shape `PVE::Tools::upid_decode` accepts.
pub(crate) fn upid_parses(upid: &str) -> bool {
    let Some(body) = upid
        .strip_prefix("UPID:")
        .and_then(|rest| rest.strip_suffix(':'))
    else {
        return false;
    };
    let parts: Vec<&str> = body.split(':').collect();
    let [node, pid, pstart, start, kind, id, user] = parts.as_slice() else {
        return false;
    };
    let hex = |s: &str, lens: &[usize]| {
        lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
    };
    let plain = |s: &str| !s.chars().any(|c| c.is_whitespace() || c == '/');
    let node_ok = !node.is_empty()
        && node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !node.starts_with('-')
        && !node.ends_with('-');
    node_ok
        && hex(pid, &[8])
        && hex(pstart, &[8, 9])
        && hex(start, &[8])
        && !kind.is_empty()
        && plain(kind)
        && plain(id)
        && !user.is_empty()
        && plain(user)
}

fn find(ctx: &mut Ctx<'_>, params: &Params) -> Result<Task, ApiError> {
    let node = params.str("node").unwrap_or_default().to_owned();
    let upid = params.str("upid").unwrap_or_default().to_owned();
    if !upid_parses(&upid) {
        return Err(ApiError::param("upid", "unable to parse worker upid"));
    }
    ctx.node(params)?;
    let task = ctx
        .state
        .poll_task(&node, &upid)
        .cloned()
        .ok_or_else(|| ApiError::param("upid", "no such task"))?;
    let own = ctx
        .who
        .is_none_or(|who| who.userid == task.principal.userid);
    if !own && !ctx.has(&format!("/nodes/{node}"), &["Sys.Audit"]) {
        return Err(ApiError::forbidden(
            &format!("/nodes/{node}"),
            &["Sys.Audit"],
        ));
    }
    Ok(task)
}

fn status(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let task = find(ctx, params)?;
    let mut out = Map::new();
    out.insert("upid".into(), json!(task.upid));
    out.insert("node".into(), json!(task.node));
    out.insert("pid".into(), json!(task.pid));
    out.insert("pstart".into(), json!(task.pstart));
    out.insert("starttime".into(), json!(task.starttime));
    out.insert("type".into(), json!(task.kind.as_str()));
    out.insert("id".into(), json!(task.id));
    out.insert("user".into(), json!(task.principal.userid));
    if let Some(token) = &task.principal.tokenid {
        out.insert("tokenid".into(), json!(token));
    }
    if task.finished {
        out.insert("status".into(), json!("stopped"));
        out.insert("exitstatus".into(), json!(task.end.exitstatus()));
    } else {
        out.insert("status".into(), json!("running"));
    }
    Ok(Reply::Data(Value::Object(out)))
}

fn log(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let start = params.int("start").unwrap_or(0).max(0) as usize;
    let limit = params.int("limit").unwrap_or(50).max(0) as usize;
    let task = find(ctx, params)?;
    let mut lines = task.visible_log();
    if lines.is_empty() {
        lines.push("no content".to_owned());
    }
    let total = lines.len() as u64;
    let page: Vec<Value> = lines
        .iter()
        .enumerate()
        .skip(start)
        .take(limit)
        .map(|(i, t)| json!({"n": i + 1, "t": t}))
        .collect();
    Ok(Reply::Total(Value::Array(page), total))
}

#[cfg(test)]
mod tests {
    use super::upid_parses;

    #[test]
    fn upids_parse_like_pve() {
        assert!(upid_parses(
            "UPID:pve1:0003A1F2:01B2C3D4:66F0A1B2:qmclone:9000:coord@pve!prov:"
        ));
        assert!(upid_parses(
            "UPID:pve1:0003A2B1:101B2C5E0:66F0A1B4:imgcopy::coord@pve!prov:"
        ));
        assert!(!upid_parses(
            "UPID:pve1:0003A1F2:01B2C3D4:66F0A1B2:qmclone:9000:coord@pve!prov"
        ));
        assert!(!upid_parses("garbage"));
    }
}
