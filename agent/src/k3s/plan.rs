//! The install plan: what K3s on this node should be, carried as JSON in the `plan_json` of an
//! `Assignment` directive. The coordinator produces exactly this document; this module is the
//! contract.
//!
//! # Schema 1
//!
//! ```json
//! {
//!   "schema": 1,
//!   "revision": 7,
//!   "install_revision": 1,
//!   "role": "server",
//!   "version": "v1.31.4+k3s1",
//!   "channel": "stable",
//!   "installer": { "url": "https://get.k3s.io" },
//!   "token": "<server token>",
//!   "agent_token": "K10<ca hash>::node:<password>",
//!   "config": {
//!     "cluster-init": true,
//!     "node-name": "cp-1",
//!     "node-ip": "10.0.0.11",
//!     "tls-san": ["k8s-api.home.internal", "10.0.0.10"],
//!     "disable": ["traefik"],
//!     "write-kubeconfig-mode": "0600"
//!   }
//! }
//! ```
//!
//! Rules:
//! 1. Unknown fields are refused at every level, so a typo or a newer coordinator fails loudly
//!    instead of being ignored.
//! 2. `schema` is `1`. Any other value is refused before anything else is read.
//! 3. `revision` is the directive revision the coordinator built the plan for. The same plan
//!    may be pushed again under a later directive revision (the coordinator re-pushes desired
//!    state when a node says hello); the agent then tracks it under the directive's revision,
//!    and recognises it as the same work by its [`fingerprint`], which leaves `revision` out.
//!    A plan revision above its directive's is refused. `role` (`"server"` or `"agent"`)
//!    equals the `Assignment`'s `role`; a mismatch is refused.
//! 4. `install_revision` (required): bump it to force a reinstall (installer fetched and run
//!    again, unit restarted) even when nothing else changed.
//! 5. `version` (optional, `null` or absent): an exact K3s release tag such as
//!    `v1.31.4+k3s1`, passed as `INSTALL_K3S_VERSION`. When absent, `channel` (default
//!    `"stable"`) is passed as `INSTALL_K3S_CHANNEL`. Changing `version` upgrades the node;
//!    the coordinator upgrades servers before agents, one at a time.
//! 6. `installer` (optional): exactly one of `{"url": "http(s)://…"}`, `{"file": "/abs/path"}`
//!    (a path on the node) or `{"inline": "#!/bin/sh …"}` (the script itself, sent by the
//!    coordinator, for air-gapped homelabs). Default `{"url": "https://get.k3s.io"}`.
//! 7. `token` (required): for a server, the server token (short form on the first server, the
//!    same value on every server); for an agent, the agent token, ideally in the secure
//!    `K10<ca hash>::…` form so the agent pins the cluster CA.
//! 8. `agent_token` (optional, servers only): the separate agent token; written to
//!    `/etc/rancher/k3s/agent-token` and named by `agent-token-file`.
//! 9. `config` (optional, default `{}`): `config.yaml` keys (K3s flags without `--`) to JSON
//!    strings, numbers, booleans or lists of those. It never holds tokens: `token`,
//!    `token-file`, `agent-token` and `agent-token-file` are refused (the agent adds
//!    `token-file` and `agent-token-file` itself), and so is any value equal to a token. An
//!    agent's `config` must name its `server`.
//! 10. Tokens are [`Secret`]s: `Debug` prints `<redacted>`, and the agent puts them only into
//!     0600 files, never into argv, the environment, unit files or logs.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The only plan schema this agent understands.
pub const SCHEMA: u64 = 1;
/// The installer used when the plan names none.
pub const DEFAULT_INSTALLER_URL: &str = "https://get.k3s.io";
/// The channel used when the plan names none (and no version).
pub const DEFAULT_CHANNEL: &str = "stable";
/// K3s reads its settings from here.
pub const CONFIG_PATH: &str = "/etc/rancher/k3s/config.yaml";
/// The server token, named by `token-file` on servers.
pub const SERVER_TOKEN_PATH: &str = "/etc/rancher/k3s/server-token";
/// The agent token: named by `agent-token-file` on servers and by `token-file` on agents.
pub const AGENT_TOKEN_PATH: &str = "/etc/rancher/k3s/agent-token";

/// `config` keys that carry or name secrets: the agent writes those itself.
const TOKEN_KEYS: &[&str] = &["token", "token-file", "agent-token", "agent-token-file"];
/// Keys that would move or replace the file being written.
const RESERVED_KEYS: &[&str] = &["config"];
/// Fragments of a token shorter than this are not redacted on their own.
const MIN_REDACTED_LEN: usize = 6;
/// Prefixes what [`fingerprint`] hashes.
const FINGERPRINT_DOMAIN: &[u8] = b"homelab-agent k3s plan fingerprint v1\0";

/// Why a plan was refused.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the install plan is not valid JSON: {detail}")]
    NotJson { detail: String },
    #[error(
        "install plan schema {found} is not supported (this agent understands schema {SCHEMA})"
    )]
    UnsupportedSchema { found: String },
    /// The text has already been stripped of any token value.
    #[error("invalid install plan: {detail}")]
    Invalid { detail: String },
    #[error(
        "the plan is for revision {plan}, newer than the directive revision {directive} carrying it"
    )]
    RevisionMismatch { plan: u64, directive: u64 },
    #[error("the assignment names role {assigned:?} but its plan is for role {plan}")]
    RoleMismatch { assigned: String, plan: Role },
}

/// A token. Its `Debug` never shows the value; [`Secret::expose`] is the only way in.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The value, for writing the token file.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What the node becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Agent,
}

impl Role {
    /// The K3s command, as `INSTALL_K3S_EXEC`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Agent => "agent",
        }
    }

    /// The systemd unit install.sh creates for this role.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Server => "k3s",
            Self::Agent => "k3s-agent",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where install.sh comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Installer {
    /// Downloaded over HTTP(S).
    Url(String),
    /// A file already on the node (air-gapped installs).
    File(PathBuf),
    /// The script itself, sent by the coordinator over the link: nodes without a route to
    /// the internet need no download to get it.
    Inline(String),
}

impl Default for Installer {
    fn default() -> Self {
        Self::Url(DEFAULT_INSTALLER_URL.into())
    }
}

impl fmt::Display for Installer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Url(url) => f.write_str(url),
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Inline(script) => write!(f, "the coordinator ({} bytes)", script.len()),
        }
    }
}

/// Everything in a plan except its tokens: safe to log and to keep in the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// The directive revision the plan arrived with.
    pub revision: u64,
    /// Bumped by the coordinator to force a reinstall.
    pub install_revision: u64,
    pub role: Role,
    /// Exact release tag, or `None` to follow `channel`.
    pub version: Option<String>,
    pub channel: String,
    pub installer: Installer,
    /// `config.yaml` settings other than the token files.
    pub config: BTreeMap<String, Value>,
}

impl PlanSpec {
    /// Whether the plan disables flannel, so Nodes stay NotReady until a CNI is installed.
    pub fn waits_for_cni(&self) -> bool {
        self.config.get("flannel-backend").and_then(Value::as_str) == Some("none")
    }

    /// The version, or the channel it follows, for messages.
    pub fn version_text(&self) -> String {
        match &self.version {
            Some(version) => version.clone(),
            None => format!("channel {}", self.channel),
        }
    }
}

/// A plan's tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanTokens {
    /// The server token on servers, the agent token on agents.
    pub token: Secret,
    /// Servers only: the separate agent token.
    pub agent_token: Option<Secret>,
}

impl PlanTokens {
    /// A redactor that removes these tokens from text.
    pub fn redactor(&self) -> Redactor {
        let mut values = vec![self.token.expose().to_owned()];
        values.extend(self.agent_token.iter().map(|t| t.expose().to_owned()));
        Redactor::new(values)
    }
}

/// A parsed, checked install plan. Built only by [`InstallPlan::parse`] or
/// [`InstallPlan::for_directive`], so every value is one the agent can act on.
#[derive(Debug, Clone, PartialEq)]
pub struct InstallPlan {
    pub spec: PlanSpec,
    pub tokens: PlanTokens,
}

/// The JSON exactly as the coordinator sends it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WirePlan {
    #[expect(dead_code, reason = "checked before this struct is decoded")]
    schema: u64,
    revision: u64,
    install_revision: u64,
    role: Role,
    #[serde(default)]
    version: Option<String>,
    #[serde(default = "default_channel")]
    channel: String,
    #[serde(default)]
    installer: Installer,
    token: Secret,
    #[serde(default)]
    agent_token: Option<Secret>,
    #[serde(default)]
    config: BTreeMap<String, Value>,
}

fn default_channel() -> String {
    DEFAULT_CHANNEL.into()
}

impl InstallPlan {
    /// Parses and checks `plan_json` as it arrived in directive `revision` for `role`. The
    /// plan takes the directive's revision (rule 3).
    pub fn for_directive(revision: u64, role: &str, plan_json: &str) -> Result<Self, PlanError> {
        let mut plan = Self::parse(plan_json)?;
        if plan.spec.revision > revision {
            return Err(PlanError::RevisionMismatch {
                plan: plan.spec.revision,
                directive: revision,
            });
        }
        plan.spec.revision = revision;
        if role != plan.spec.role.as_str() {
            return Err(PlanError::RoleMismatch {
                assigned: role.to_owned(),
                plan: plan.spec.role,
            });
        }
        Ok(plan)
    }

    /// Parses and checks a plan document.
    pub fn parse(plan_json: &str) -> Result<Self, PlanError> {
        let value: Value = serde_json::from_str(plan_json).map_err(|e| PlanError::NotJson {
            // serde_json quotes offending values: strip anything that could be a token.
            detail: Redactor::new(token_like_strings(plan_json))
                .redact(&e.to_string())
                .into_owned(),
        })?;
        let redactor = Redactor::new(
            ["token", "agent_token"]
                .iter()
                .filter_map(|key| value.get(key).and_then(Value::as_str))
                .map(str::to_owned)
                .collect(),
        );
        match value.get("schema") {
            Some(Value::Number(n)) if n.as_u64() == Some(SCHEMA) => {}
            Some(other) => {
                return Err(PlanError::UnsupportedSchema {
                    found: redactor.redact(&other.to_string()).into_owned(),
                });
            }
            None => {
                return Err(PlanError::Invalid {
                    detail: "missing field `schema`".into(),
                });
            }
        }
        let wire: WirePlan = serde_json::from_value(value).map_err(|e| PlanError::Invalid {
            detail: redactor.redact(&e.to_string()).into_owned(),
        })?;
        Self::check(wire)
    }

    fn check(wire: WirePlan) -> Result<Self, PlanError> {
        let invalid = |detail: String| Err(PlanError::Invalid { detail });
        check_token("token", &wire.token)?;
        if let Some(agent_token) = &wire.agent_token {
            check_token("agent_token", agent_token)?;
            if wire.role == Role::Agent {
                return invalid(
                    "`agent_token` is for servers only; an agent's `token` is the agent token"
                        .into(),
                );
            }
        }
        if let Some(version) = &wire.version
            && !(version.starts_with('v') && version.len() > 1 && is_release_word(version))
        {
            return invalid(format!(
                "`version` {version:?} is not a K3s release tag such as v1.31.4+k3s1"
            ));
        }
        if !is_release_word(&wire.channel) {
            return invalid(format!(
                "`channel` {:?} is not a channel name such as stable, latest or v1.31",
                wire.channel
            ));
        }
        match &wire.installer {
            Installer::Url(url) if url.starts_with("https://") || url.starts_with("http://") => {}
            Installer::Url(url) => {
                return invalid(format!("`installer.url` {url:?} is not an http(s) URL"));
            }
            Installer::File(path) if path.is_absolute() => {}
            Installer::Inline(script) if script.starts_with("#!") => {}
            Installer::Inline(_) => {
                return invalid("`installer.inline` is not a script (no #! line)".into());
            }
            Installer::File(path) => {
                return invalid(format!(
                    "`installer.file` {} is not an absolute path",
                    path.display()
                ));
            }
        }
        let tokens = PlanTokens {
            token: wire.token,
            agent_token: wire.agent_token,
        };
        check_config(&wire.config, &tokens)?;
        if wire.role == Role::Agent && !wire.config.contains_key("server") {
            return invalid("an agent's `config` must name its `server`".into());
        }
        Ok(Self {
            spec: PlanSpec {
                revision: wire.revision,
                install_revision: wire.install_revision,
                role: wire.role,
                version: wire.version,
                channel: wire.channel,
                installer: wire.installer,
                config: wire.config,
            },
            tokens,
        })
    }

    /// The files the plan puts on the host, in the order they are written (token files
    /// before the config that names them): the content of each, or `None` for a file that
    /// must not exist.
    pub fn files(&self) -> Vec<(&'static Path, Option<Vec<u8>>)> {
        let token_file = |secret: &Secret| Some(format!("{}\n", secret.expose()).into_bytes());
        let (server_token, agent_token) = match self.spec.role {
            Role::Server => (
                token_file(&self.tokens.token),
                self.tokens.agent_token.as_ref().and_then(token_file),
            ),
            Role::Agent => (None, token_file(&self.tokens.token)),
        };
        vec![
            (Path::new(SERVER_TOKEN_PATH), server_token),
            (Path::new(AGENT_TOKEN_PATH), agent_token),
            (
                Path::new(CONFIG_PATH),
                Some(self.render_config().into_bytes()),
            ),
        ]
    }

    /// `config.yaml`: every setting of the plan plus `token-file` (and `agent-token-file` on a
    /// server with an agent token). It is JSON, which is valid YAML, with sorted keys, so the
    /// same plan always renders the same bytes.
    pub fn render_config(&self) -> String {
        let mut config = self.spec.config.clone();
        match self.spec.role {
            Role::Server => {
                config.insert("token-file".into(), SERVER_TOKEN_PATH.into());
                if self.tokens.agent_token.is_some() {
                    config.insert("agent-token-file".into(), AGENT_TOKEN_PATH.into());
                }
            }
            Role::Agent => {
                config.insert("token-file".into(), AGENT_TOKEN_PATH.into());
            }
        }
        // Invariant: a map of strings to JSON values always serializes.
        let body = serde_json::to_string_pretty(&config).unwrap_or_else(|_| "{}".into());
        format!(
            "# Written by homelab-agent from the coordinator's install plan; edits are overwritten.\n{body}\n"
        )
    }

    /// The hash of [`InstallPlan::files`], comparable with [`files_hash`] of what is on disk.
    pub fn config_hash(&self) -> String {
        files_hash(
            self.files()
                .iter()
                .map(|(path, contents)| (*path, contents.as_deref())),
        )
    }

    /// The plan's [`fingerprint`]: equal for the same plan pushed under another revision.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.spec, &self.config_hash())
    }
}

/// Identifies the work a plan asks for regardless of its `revision` (rule 3), from what a
/// checkpoint keeps of it: the spec and the hash of its files ([`InstallPlan::config_hash`]).
/// No token goes in, only that files hash, which covers the token files: a changed token
/// changes the fingerprint, and the fingerprint reveals nothing the checkpoint does not
/// already hold. Domain-separated, so it equals no other hash the agent computes.
pub fn fingerprint(spec: &PlanSpec, config_hash: &str) -> String {
    let spec = PlanSpec {
        revision: 0,
        ..spec.clone()
    };
    // Invariant: a PlanSpec (plain fields, a map of strings to JSON values) always serializes.
    let text = serde_json::to_vec(&spec).unwrap_or_default();
    let mut hasher = Sha256::new();
    hasher.update(FINGERPRINT_DOMAIN);
    hasher.update((text.len() as u64).to_be_bytes());
    hasher.update(&text);
    hasher.update(config_hash.as_bytes());
    hex::encode(hasher.finalize())
}

/// SHA-256 over paths and contents (or absence), lowercase hex.
pub fn files_hash<'a>(files: impl IntoIterator<Item = (&'a Path, Option<&'a [u8]>)>) -> String {
    let mut hasher = Sha256::new();
    for (path, contents) in files {
        hasher.update(path.as_os_str().as_encoded_bytes());
        match contents {
            Some(bytes) => {
                hasher.update([1]);
                hasher.update((bytes.len() as u64).to_be_bytes());
                hasher.update(bytes);
            }
            None => hasher.update([0]),
        }
    }
    hex::encode(hasher.finalize())
}

fn check_token(field: &str, token: &Secret) -> Result<(), PlanError> {
    let value = token.expose();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(PlanError::Invalid {
            detail: format!("`{field}` must be one line of printable ASCII without spaces"),
        });
    }
    Ok(())
}

fn check_config(config: &BTreeMap<String, Value>, tokens: &PlanTokens) -> Result<(), PlanError> {
    let redactor = tokens.redactor();
    for (key, value) in config {
        let bare = key.strip_suffix('+').unwrap_or(key);
        let detail = if TOKEN_KEYS.contains(&bare) {
            format!(
                "`config` must not hold {key:?}: tokens go in `token`/`agent_token`, and the agent names their files"
            )
        } else if RESERVED_KEYS.contains(&bare) {
            format!("`config` must not hold {key:?}")
        } else if !is_flag_name(bare) {
            format!("`config` key {key:?} is not a K3s flag name")
        } else if !is_flag_value(value) {
            format!(
                "`config` value of {key:?} must be a string, number, boolean or a list of those"
            )
        } else if redactor.redact(&value.to_string()) != value.to_string() {
            format!("`config` value of {key:?} contains a token; tokens go only in token files")
        } else {
            continue;
        };
        return Err(PlanError::Invalid { detail });
    }
    Ok(())
}

fn is_flag_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_flag_value(value: &Value) -> bool {
    match value {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => true,
        Value::Array(items) => items
            .iter()
            .all(|v| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))),
        Value::Null | Value::Object(_) => false,
    }
}

/// A release tag or channel name: letters, digits, `.`, `+`, `-`.
fn is_release_word(word: &str) -> bool {
    !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'))
}

/// Every quoted string in a document that failed to parse, for redacting its error.
fn token_like_strings(text: &str) -> Vec<String> {
    text.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.len() >= MIN_REDACTED_LEN)
        .map(str::to_owned)
        .collect()
}

/// Removes secrets from text before it is logged or reported.
#[derive(Clone, Default)]
pub struct Redactor {
    needles: Vec<String>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} needles)", self.needles.len())
    }
}

impl Redactor {
    /// A redactor for these secret values. For a secure token (`K10<hash>::<user>:<password>`)
    /// the credentials and the password alone are removed too.
    pub fn new(secrets: Vec<String>) -> Self {
        let mut needles = Vec::new();
        for secret in secrets {
            let secret = secret.trim().to_owned();
            if let Some((_, credentials)) = secret.split_once("::") {
                needles.push(credentials.to_owned());
                if let Some((_, password)) = credentials.rsplit_once(':') {
                    needles.push(password.to_owned());
                }
            }
            needles.push(secret);
        }
        needles.retain(|n| n.len() >= MIN_REDACTED_LEN);
        // Longest first, so a token is replaced whole before its parts are looked for.
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        needles.dedup();
        Self { needles }
    }

    /// `text` with every secret replaced by `<redacted>`.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = Cow::Owned(out.replace(needle.as_str(), "<redacted>"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SERVER_TOKEN: &str = "s3cr3t-server-token-value";
    const AGENT_TOKEN: &str = "K10aaaabbbbccccdddd::node:agentpassword99";

    fn server_json() -> Value {
        json!({
            "schema": 1,
            "revision": 7,
            "install_revision": 1,
            "role": "server",
            "version": "v1.31.4+k3s1",
            "channel": "stable",
            "installer": {"url": "https://get.k3s.io"},
            "token": SERVER_TOKEN,
            "agent_token": AGENT_TOKEN,
            "config": {"cluster-init": true, "node-name": "cp-1", "tls-san": ["10.0.0.10"], "disable": ["traefik"]}
        })
    }

    fn parse(value: &Value) -> Result<InstallPlan, PlanError> {
        InstallPlan::parse(&value.to_string())
    }

    #[test]
    fn the_documented_server_plan_parses_and_debug_hides_tokens() {
        let plan = InstallPlan::for_directive(7, "server", &server_json().to_string()).unwrap();
        assert_eq!(plan.spec.role, Role::Server);
        assert_eq!(plan.spec.version.as_deref(), Some("v1.31.4+k3s1"));
        let debug = format!("{plan:?}");
        assert!(!debug.contains(SERVER_TOKEN), "{debug}");
        assert!(!debug.contains("agentpassword99"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn an_inline_installer_is_a_script_or_refused() {
        let mut plan = server_json();
        plan["installer"] = json!({"inline": "#!/bin/sh\necho install\n"});
        let parsed = parse(&plan).unwrap();
        assert!(matches!(parsed.spec.installer, Installer::Inline(ref s) if s.starts_with("#!")));
        assert_eq!(
            parsed.spec.installer.to_string(),
            "the coordinator (23 bytes)"
        );
        plan["installer"] = json!({"inline": "not a script"});
        assert!(parse(&plan).is_err());
    }

    #[test]
    fn defaults_fill_channel_installer_and_config() {
        let plan = parse(&json!({
            "schema": 1, "revision": 1, "install_revision": 0, "role": "agent",
            "token": AGENT_TOKEN, "config": {"server": "https://10.0.0.11:6443"}
        }))
        .unwrap();
        assert_eq!(plan.spec.channel, "stable");
        assert_eq!(
            plan.spec.installer,
            Installer::Url(DEFAULT_INSTALLER_URL.into())
        );
        assert_eq!(plan.spec.version, None);
    }

    #[test]
    fn config_yaml_names_token_files_and_never_holds_a_token() {
        let plan = parse(&server_json()).unwrap();
        let yaml = plan.render_config();
        assert!(
            yaml.contains(r#""token-file": "/etc/rancher/k3s/server-token""#),
            "{yaml}"
        );
        assert!(yaml.contains(r#""agent-token-file": "/etc/rancher/k3s/agent-token""#));
        assert!(!yaml.contains(SERVER_TOKEN) && !yaml.contains(AGENT_TOKEN));
        // The body after the comment line is JSON, hence YAML.
        let body: Value = serde_json::from_str(yaml.split_once('\n').unwrap().1).unwrap();
        assert_eq!(body["cluster-init"], json!(true));
        let files = plan.files();
        assert_eq!(
            files[0].1.as_deref(),
            Some(format!("{SERVER_TOKEN}\n").as_bytes())
        );
        assert_eq!(
            files[1].1.as_deref(),
            Some(format!("{AGENT_TOKEN}\n").as_bytes())
        );
    }

    #[test]
    fn an_agent_uses_its_token_as_the_agent_token_file_and_has_no_server_token() {
        let plan = parse(&json!({
            "schema": 1, "revision": 1, "install_revision": 0, "role": "agent",
            "token": AGENT_TOKEN, "config": {"server": "https://10.0.0.11:6443"}
        }))
        .unwrap();
        let files = plan.files();
        assert_eq!(files[0], (Path::new(SERVER_TOKEN_PATH), None));
        assert_eq!(
            files[1].1.as_deref(),
            Some(format!("{AGENT_TOKEN}\n").as_bytes())
        );
        assert!(
            plan.render_config()
                .contains(r#""token-file": "/etc/rancher/k3s/agent-token""#)
        );
    }

    #[test]
    fn bad_plans_are_refused_with_the_reason_and_without_the_token() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"schema": 2}), "schema 2 is not supported"),
            (
                {
                    let mut v = server_json();
                    v["tokn"] = json!(1);
                    v
                },
                "unknown field `tokn`",
            ),
            (
                {
                    let mut v = server_json();
                    v["role"] = json!("etcd");
                    v
                },
                "unknown variant `etcd`",
            ),
            (
                {
                    let mut v = server_json();
                    v["config"]["token"] = json!("x");
                    v
                },
                "must not hold \"token\"",
            ),
            (
                {
                    let mut v = server_json();
                    v["config"]["agent-token-file"] = json!("/x");
                    v
                },
                "must not hold",
            ),
            (
                {
                    let mut v = server_json();
                    v["config"]["node-label"] = json!({"a": "b"});
                    v
                },
                "must be a string",
            ),
            (
                {
                    let mut v = server_json();
                    v["config"]["Bad_Key"] = json!("x");
                    v
                },
                "not a K3s flag name",
            ),
            (
                {
                    let mut v = server_json();
                    v["config"]["node-label"] = json!([format!("t={SERVER_TOKEN}")]);
                    v
                },
                "contains a token",
            ),
            (
                {
                    let mut v = server_json();
                    v["version"] = json!("1.31; rm -rf /");
                    v
                },
                "not a K3s release tag",
            ),
            (
                {
                    let mut v = server_json();
                    v["installer"] = json!({"url": "ftp://x"});
                    v
                },
                "not an http(s) URL",
            ),
            (
                {
                    let mut v = server_json();
                    v["installer"] = json!({"file": "install.sh"});
                    v
                },
                "not an absolute path",
            ),
            (
                {
                    let mut v = server_json();
                    v["token"] = json!("two words");
                    v
                },
                "printable ASCII",
            ),
            (
                {
                    let mut v = server_json();
                    v["role"] = json!("agent");
                    v["config"]["server"] = json!("https://x:6443");
                    v
                },
                "servers only",
            ),
            (
                {
                    let mut v = server_json();
                    v["role"] = json!("agent");
                    v.as_object_mut().unwrap().remove("agent_token");
                    v
                },
                "must name its `server`",
            ),
            (
                {
                    let mut v = server_json();
                    v["revision"] = json!(SERVER_TOKEN);
                    v
                },
                "invalid type",
            ),
        ];
        for (value, expected) in cases {
            let err = parse(&value).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
            assert!(!err.contains(SERVER_TOKEN), "{err}");
        }
        let err = InstallPlan::parse(&format!("{{\"token\": \"{SERVER_TOKEN}\" oops")).unwrap_err();
        assert!(!err.to_string().contains(SERVER_TOKEN), "{err}");
    }

    #[test]
    fn a_plan_takes_its_directive_revision_and_role_must_match() {
        let text = server_json().to_string();
        assert!(matches!(
            InstallPlan::for_directive(6, "server", &text),
            Err(PlanError::RevisionMismatch {
                plan: 7,
                directive: 6
            })
        ));
        let pushed_again = InstallPlan::for_directive(9, "server", &text).unwrap();
        assert_eq!(pushed_again.spec.revision, 9);
        assert!(matches!(
            InstallPlan::for_directive(7, "agent", &text),
            Err(PlanError::RoleMismatch { .. })
        ));
    }

    #[test]
    fn the_fingerprint_ignores_the_revision_and_follows_everything_else_without_a_token() {
        let fingerprint_of = |value: &Value| parse(value).unwrap().fingerprint();
        let original = fingerprint_of(&server_json());
        assert_eq!(original.len(), 64);
        let mut bumped = server_json();
        bumped["revision"] = json!(9);
        assert_eq!(fingerprint_of(&bumped), original);
        let pushed_again = InstallPlan::for_directive(9, "server", &server_json().to_string())
            .unwrap()
            .fingerprint();
        assert_eq!(pushed_again, original);
        // Key order in the document does not matter, only the plan.
        let reordered = r#"{"config":{"disable":["traefik"],"tls-san":["10.0.0.10"],"node-name":"cp-1","cluster-init":true},"agent_token":"K10aaaabbbbccccdddd::node:agentpassword99","token":"s3cr3t-server-token-value","installer":{"url":"https://get.k3s.io"},"channel":"stable","version":"v1.31.4+k3s1","role":"server","install_revision":1,"revision":7,"schema":1}"#;
        assert_eq!(
            InstallPlan::parse(reordered).unwrap().fingerprint(),
            original
        );

        let changes: Vec<(&str, Value)> = vec![
            ("install_revision", json!(2)),
            ("version", json!("v1.31.5+k3s1")),
            ("installer", json!({"file": "/opt/install.sh"})),
            ("token", json!("an-0ther-server-token-value")),
            (
                "agent_token",
                json!("K10aaaabbbbccccdddd::node:otherpassword77"),
            ),
        ];
        for (key, value) in changes {
            let mut changed = server_json();
            changed[key] = value;
            assert_ne!(fingerprint_of(&changed), original, "{key}");
        }
        let mut changed = server_json();
        changed["config"]["node-ip"] = json!("10.0.0.12");
        assert_ne!(fingerprint_of(&changed), original, "config");
        // Not a plain hash of anything token-derived the agent keeps.
        let plan = parse(&server_json()).unwrap();
        assert_ne!(original, plan.config_hash());
        assert_ne!(
            original,
            hex::encode(Sha256::digest(SERVER_TOKEN.as_bytes()))
        );
    }

    #[test]
    fn redactor_removes_tokens_and_their_credentials() {
        let redactor = parse(&server_json()).unwrap().tokens.redactor();
        let text =
            format!("a {SERVER_TOKEN} b {AGENT_TOKEN} c node:agentpassword99 d agentpassword99");
        let clean = redactor.redact(&text);
        assert!(
            !clean.contains(SERVER_TOKEN) && !clean.contains("agentpassword99"),
            "{clean}"
        );
        assert_eq!(redactor.redact("nothing secret"), "nothing secret");
    }

    #[test]
    fn config_hash_follows_the_files() {
        let a = parse(&server_json()).unwrap();
        let mut changed = server_json();
        changed["config"]["node-ip"] = json!("10.0.0.12");
        let b = parse(&changed).unwrap();
        let mut bumped = server_json();
        bumped["revision"] = json!(8);
        let c = parse(&bumped).unwrap();
        assert_ne!(a.config_hash(), b.config_hash());
        assert_eq!(
            a.config_hash(),
            c.config_hash(),
            "the revision is not part of config.yaml"
        );
    }
}
