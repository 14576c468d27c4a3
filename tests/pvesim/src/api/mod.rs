//! The API handlers: routing, the handler error type, and helpers shared by the endpoints.
//!
//! Every handler runs synchronously under the state lock with a [`Ctx`], and returns a
//! [`Reply`] or an [`ApiError`]; [`crate::http`] turns either into the wire format. Errors are
//! worded like the Perl code, trailing `\n` included where PVE has one.

mod access;
mod cluster;
mod qemu;
mod storage;
mod tasks;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::config::Acl;
use crate::schema::{self, Params, RawValue, Schema};
use crate::server::Shared;
use crate::state::{Principal, State, Vm};

/// A handler failure: the status, the message (first line becomes the reason phrase) and, for
/// parameter errors, the per-parameter messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {}", message.trim_end())]
pub(crate) struct ApiError {
    pub(crate) status: u16,
    pub(crate) message: String,
    pub(crate) errors: BTreeMap<String, String>,
}

impl ApiError {
    /// A Perl `die "…\n"` in a handler: 500.
    pub(crate) fn die(message: impl Into<String>) -> Self {
        Self::status(500, message)
    }

    /// An exception with an explicit status; `\n` is appended as `die` would have it.
    pub(crate) fn status(status: u16, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if !message.ends_with('\n') {
            message.push('\n');
        }
        Self {
            status,
            message,
            errors: BTreeMap::new(),
        }
    }

    /// `raise_param_exc`: 400 `Parameter verification failed.` with per-parameter messages.
    pub(crate) fn params(errors: BTreeMap<String, String>) -> Self {
        Self {
            status: 400,
            message: "Parameter verification failed.\n".to_owned(),
            errors,
        }
    }

    pub(crate) fn param(name: &str, message: impl Into<String>) -> Self {
        Self::params(BTreeMap::from([(name.to_owned(), message.into())]))
    }

    /// 403 from a permission check.
    pub(crate) fn forbidden(path: &str, privileges: &[&str]) -> Self {
        Self::status(
            403,
            format!("Permission check failed ({path}, {})", privileges.join("|")),
        )
    }

    /// No handler for this method and path.
    pub(crate) fn not_implemented(method: &str, path: &str) -> Self {
        Self {
            status: 501,
            message: format!("Method '{method} {path}' not implemented"),
            errors: BTreeMap::new(),
        }
    }
}

/// A handler's success.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// `{"data": …}`
    Data(Value),
    /// `{"data": …, "total": n}`
    Total(Value, u64),
    /// Wait up to `wait` for task `upid`: `null` if it finished well in time, its error if
    /// it failed, else the UPID (`background_delay`, `delay`).
    Await { upid: String, wait: Duration },
}

/// The uploaded file of a multipart request.
#[derive(Debug, Clone)]
pub(crate) struct UploadedFile {
    pub(crate) data: Vec<u8>,
}

/// What a handler works with.
pub(crate) struct Ctx<'a> {
    pub(crate) state: &'a mut State,
    pub(crate) shared: &'a Shared,
    pub(crate) now: Instant,
    /// The caller; `None` only for the unauthenticated login call.
    pub(crate) who: Option<&'a Principal>,
    pub(crate) acl: &'a Acl,
    pub(crate) upload: Option<UploadedFile>,
}

impl Ctx<'_> {
    /// Whether the caller holds one of `privileges` on `path` (or a parent path).
    pub(crate) fn has(&self, path: &str, privileges: &[&str]) -> bool {
        match self.acl {
            Acl::All => true,
            Acl::Grants(grants) => grants.iter().any(|g| {
                let covers =
                    g.path == "/" || path == g.path || path.starts_with(&format!("{}/", g.path));
                covers
                    && g.privileges
                        .iter()
                        .any(|p| privileges.contains(&p.as_str()))
            }),
        }
    }

    /// 403 unless [`Ctx::has`].
    pub(crate) fn check(&self, path: &str, privileges: &[&str]) -> Result<(), ApiError> {
        if self.has(path, privileges) {
            Ok(())
        } else {
            Err(ApiError::forbidden(path, privileges))
        }
    }

    pub(crate) fn principal(&self) -> Principal {
        self.who.cloned().unwrap_or_else(|| Principal {
            userid: "root@pam".to_owned(),
            tokenid: None,
        })
    }

    /// The `{node}` path parameter, which must name a cluster node.
    pub(crate) fn node<'p>(&self, params: &'p Params) -> Result<&'p str, ApiError> {
        let node = params.str("node").unwrap_or_default();
        if self.state.nodes.iter().any(|n| n == node) {
            Ok(node)
        } else {
            Err(ApiError::die(format!("no such cluster node '{node}'")))
        }
    }

    /// The VM `{vmid}` on `{node}`, as `load_config` finds it.
    pub(crate) fn vm(&self, node: &str, vmid: u32) -> Result<&Vm, ApiError> {
        self.state
            .vms
            .get(&vmid)
            .filter(|vm| vm.node == node)
            .ok_or_else(|| missing_vm(node, vmid))
    }
}

pub(crate) fn missing_vm(node: &str, vmid: u32) -> ApiError {
    ApiError::die(format!(
        "Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"
    ))
}

/// `VM is locked (<lock>)` if the config has a lock.
pub(crate) fn check_lock(vm: &Vm) -> Result<(), ApiError> {
    match vm.lock() {
        Some(lock) => Err(ApiError::die(format!("VM is locked ({lock})"))),
        None => Ok(()),
    }
}

/// The `{vmid}` parameter (validated as a VM id by the schema).
pub(crate) fn vmid(params: &Params, name: &str) -> u32 {
    params
        .int(name)
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or_default()
}

type Handler = fn(&mut Ctx<'_>, &Params) -> Result<Reply, ApiError>;

/// A method on a path: its parameters and its handler.
pub(crate) struct Endpoint {
    pub(crate) schema: Schema,
    pub(crate) handler: Handler,
}

/// A routed request: the endpoint and the parameters taken from the path.
pub(crate) struct Route {
    pub(crate) endpoint: &'static Endpoint,
    pub(crate) path_params: Vec<(&'static str, String)>,
}

/// Finds the endpoint for `method` on the decoded path below `/api2/<format>`.
pub(crate) fn route(method: &str, path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let plain = |endpoint: &'static Endpoint| Route {
        endpoint,
        path_params: Vec::new(),
    };
    let with = |endpoint: &'static Endpoint, params: &[(&'static str, &str)]| Route {
        endpoint,
        path_params: params.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
    };
    Some(match (method, segs.as_slice()) {
        ("GET", ["version"]) => plain(&cluster::VERSION),
        ("GET", ["nodes"]) => plain(&cluster::NODES),
        ("GET", ["cluster", "nextid"]) => plain(&cluster::NEXTID),
        ("GET", ["cluster", "resources"]) => plain(&cluster::RESOURCES),
        ("GET", ["access", "ticket"]) => plain(&access::TICKET_FORM),
        ("POST", ["access", "ticket"]) => plain(&access::TICKET),
        ("GET", ["nodes", node, "qemu"]) => with(&qemu::LIST, &[("node", node)]),
        (m, ["nodes", node, "qemu", vmid, rest @ ..]) => {
            let endpoint = qemu::route(m, rest)?;
            with(endpoint, &[("node", node), ("vmid", vmid)])
        }
        (m, ["nodes", node, "tasks", upid, what]) => {
            let endpoint = tasks::route(m, what)?;
            with(endpoint, &[("node", node), ("upid", upid)])
        }
        ("GET", ["nodes", node, "storage", storage, "content"]) => {
            with(&storage::CONTENT, &[("node", node), ("storage", storage)])
        }
        ("DELETE", ["nodes", node, "storage", storage, "content", volume @ ..])
            if !volume.is_empty() =>
        {
            let volume = volume.join("/");
            with(
                &storage::DELETE_VOLUME,
                &[("node", node), ("storage", storage), ("volume", &volume)],
            )
        }
        ("POST", ["nodes", node, "storage", storage, "upload"]) => {
            with(&storage::UPLOAD, &[("node", node), ("storage", storage)])
        }
        _ => return None,
    })
}

/// Whether the request is an upload (pveproxy's `isUpload`: no CSRF, multipart body).
pub(crate) fn is_upload(method: &str, path: &str) -> bool {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    method == "POST" && matches!(segs.as_slice(), ["nodes", _, "storage", _, "upload"])
}

/// Merges the path parameters into the request's, validates them, and runs the handler.
pub(crate) fn dispatch(
    ctx: &mut Ctx<'_>,
    method: &str,
    path: &str,
    mut raw: BTreeMap<String, RawValue>,
) -> Result<Reply, ApiError> {
    let Some(route) = route(method, path) else {
        return Err(ApiError::not_implemented(method, path));
    };
    for (name, value) in route.path_params {
        if let Some(existing) = raw.get(name) {
            let same = match existing {
                RawValue::Text(s) => *s == value,
                RawValue::Json(Value::String(s)) => *s == value,
                RawValue::Json(other) => format!("{other}") == value,
            };
            if !same {
                return Err(ApiError::param(
                    name,
                    "duplicate parameter (already defined in URI) with conflicting values!",
                ));
            }
        }
        raw.insert(name.to_owned(), RawValue::Text(value));
    }
    let params = schema::validate(&route.endpoint.schema, &raw).map_err(ApiError::params)?;
    (route.endpoint.handler)(ctx, &params)
}

/// JSON integer, for optional numeric fields.
pub(crate) fn num(v: u64) -> Value {
    Value::from(v)
}
