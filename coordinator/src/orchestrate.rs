//! Role orchestration: which node gets which K3s install plan, and when.
//!
//! [`decide`] is a pure function of the desired cluster, the cluster secrets and what the
//! coordinator observes of each node. The daemon calls it whenever an input changes (a node
//! says hello, a node's readiness changes, the desired cluster changes) and pushes the plans
//! whose content differs from what the node last received. Rules:
//!
//! 1. Roles come from the spec. The first server in spec order is the *first server*; with
//!    more than one server it runs `cluster-init` (embedded etcd).
//! 2. The first server is assigned as soon as it is connected. It receives the server token
//!    in its short form: its CA does not exist yet.
//! 3. Every other server joins strictly one at a time: server *i* is assigned only when
//!    servers *0..i* are all Ready and the first server has reported the cluster CA hash.
//!    It joins `https://<first server>:6443` with the secure `K10<hash>::server:<token>`.
//! 4. Agents are assigned, all at once, when the first server is Ready and the CA hash is
//!    known. They receive only the agent token, in its secure `K10<hash>::node:<token>` form,
//!    so they verify the server they join. Workers never receive the server token.
//! 5. Every server carries the same critical settings (one source: the spec) and the same
//!    agent token.
//! 6. A version change upgrades servers first, one at a time (each after every server before
//!    it runs the new version and is Ready), then all agents. Until its turn a node's plan
//!    keeps the version it runs, so nothing is pushed to it.
//!
//! The plan JSON is the agent's contract, `agent/src/k3s/plan.rs`, schema 1.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
};

use serde_json::{Value, json};

use crate::spec::Role;

/// The installer every node fetches unless the spec says otherwise.
pub const DEFAULT_INSTALLER_URL: &str = "https://get.k3s.io";
/// K3s server keys that take a list (repeatable flags).
const LIST_KEYS: &[&str] = &[
    "disable",
    "tls-san",
    "node-label",
    "node-taint",
    "kube-apiserver-arg",
    "kubelet-arg",
];

/// One node of the desired cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredNode {
    pub name: String,
    pub role: Role,
    pub ip: Ipv4Addr,
}

/// Settings every node shares.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClusterSettings {
    pub version: Option<String>,
    pub channel: String,
    /// `INSTALL_K3S_EXEC`-style server flags; turned into config.yaml keys.
    pub server_flags: Vec<String>,
    pub install_revision: u64,
    /// Extra config.yaml keys for every node's role (critical values go to servers).
    pub config: BTreeMap<String, Value>,
    /// `{"url": …}` or `{"file": …}`.
    pub installer: Value,
}

impl ClusterSettings {
    /// The spec's `[k3s]` settings; an `installer_file` is read (relative to `spec_dir`) and
    /// sent inline.
    pub fn from_spec(
        k3s: &crate::spec::K3sSpec,
        spec_dir: &std::path::Path,
    ) -> Result<Self, std::io::Error> {
        let installer = match (&k3s.installer_file, &k3s.installer_url) {
            (Some(file), _) => json!({ "inline": std::fs::read_to_string(spec_dir.join(file))? }),
            (None, Some(url)) => json!({ "url": url }),
            (None, None) => json!({ "url": DEFAULT_INSTALLER_URL }),
        };
        Ok(Self {
            version: k3s.version.clone(),
            channel: k3s.channel.clone(),
            server_flags: k3s.server_flags.clone(),
            install_revision: k3s.install_revision,
            config: k3s
                .config
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(Value::Null)))
                .collect(),
            installer,
        })
    }

    /// The desired cluster of a spec: nodes in spec order.
    pub fn desired_nodes(spec: &crate::spec::Spec) -> Vec<DesiredNode> {
        spec.vms
            .iter()
            .map(|vm| DesiredNode {
                name: vm.name.get_ref().clone(),
                role: vm.role,
                ip: *vm.ip.get_ref(),
            })
            .collect()
    }
}

/// Records the desired cluster in the state database: the nodes in spec order and the
/// settings, generating the cluster's K3s tokens the first time.
pub fn record_desired(
    store: &mut crate::store::Store,
    nodes: &[DesiredNode],
    settings: &ClusterSettings,
) -> Result<(), crate::store::StoreError> {
    store.cluster_secrets(crate::core::generate_tokens)?;
    let rows: Vec<(String, String, String)> = nodes
        .iter()
        .map(|n| (n.name.clone(), n.role.as_str().to_owned(), n.ip.to_string()))
        .collect();
    // Invariant: plain strings, numbers and JSON values always serialize.
    let json = serde_json::to_string(settings).expect("settings serialize");
    store.set_desired_cluster(&rows, &json)
}

/// The cluster's K3s secrets, generated by the coordinator before any VM exists.
#[derive(Clone)]
pub struct ClusterSecrets {
    pub server_token: String,
    pub agent_token: String,
    /// SHA-256 of the first server's cluster CA, once it has reported it.
    pub ca_hash: Option<String>,
}

impl fmt::Debug for ClusterSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSecrets")
            .field("server_token", &"<redacted>")
            .field("agent_token", &"<redacted>")
            .field("ca_hash", &self.ca_hash)
            .finish()
    }
}

impl ClusterSecrets {
    /// Fresh tokens: 48 letters and digits each. No `:` or `.`, so no tool splits them and
    /// K3s never mistakes them for bootstrap tokens.
    pub fn generate() -> Self {
        Self {
            server_token: random_token(),
            agent_token: random_token(),
            ca_hash: None,
        }
    }
}

fn random_token() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 48)
}

/// What the coordinator knows of a node now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub connected: bool,
    /// K3s Ready (for an agent: as a server sees it).
    pub ready: bool,
    /// The K3s version the node reports running, if it has reported one.
    pub version: Option<String>,
}

/// A plan for one node, without its directive revision (added when pushed).
#[derive(Clone, PartialEq)]
pub struct PlanDraft {
    pub node: String,
    pub role: Role,
    /// The plan document minus `revision`.
    body: serde_json::Map<String, Value>,
}

impl fmt::Debug for PlanDraft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = self.body.get("config").cloned().unwrap_or(Value::Null);
        f.debug_struct("PlanDraft")
            .field("node", &self.node)
            .field("role", &self.role)
            .field("config", &config)
            .finish_non_exhaustive()
    }
}

impl PlanDraft {
    /// The plan JSON for directive `revision`.
    pub fn to_json(&self, revision: u64) -> String {
        let mut body = self.body.clone();
        body.insert("revision".into(), json!(revision));
        Value::Object(body).to_string()
    }

    /// A digest of the content, to tell whether a node already has this plan.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(Value::Object(self.body.clone()).to_string()))
    }

    /// The config.yaml keys, for inspection.
    pub fn config(&self) -> Option<&serde_json::Map<String, Value>> {
        self.body.get("config").and_then(Value::as_object)
    }

    /// The token this plan hands out, for tests of who gets what.
    pub fn token(&self) -> &str {
        self.body
            .get("token")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// Whether this plan carries the agent token for a server.
    pub fn has_agent_token(&self) -> bool {
        self.body.get("agent_token").is_some_and(|v| !v.is_null())
    }
}

/// The plans that may be assigned now, in spec order (rules 1–5).
pub fn decide(
    desired: &[DesiredNode],
    settings: &ClusterSettings,
    secrets: &ClusterSecrets,
    observed: &HashMap<String, Observed>,
) -> Vec<PlanDraft> {
    let seen = |name: &str| observed.get(name).cloned().unwrap_or_default();
    let versions = plan_versions(desired, settings, observed);
    let servers: Vec<&DesiredNode> = desired.iter().filter(|n| n.role == Role::Server).collect();
    let Some(first) = servers.first() else {
        return Vec::new();
    };
    let server_url = format!("https://{}:6443", first.ip);
    let first_ready = seen(&first.name).ready;
    let joinable = first_ready.then_some(()).and(secrets.ca_hash.as_deref());
    let mut plans = Vec::new();

    // Rule 2.
    if seen(&first.name).connected {
        let mut config = server_config(first, settings);
        if servers.len() > 1 {
            config.insert("cluster-init".into(), json!(true));
        }
        plans.push(draft(
            first,
            settings,
            &versions,
            &secrets.server_token,
            Some(&secrets.agent_token),
            config,
        ));
    }
    // Rule 3: one joiner at a time, each after all before it are Ready.
    if let Some(hash) = joinable {
        for (i, server) in servers.iter().enumerate().skip(1) {
            let before_ready = servers[..i].iter().all(|s| seen(&s.name).ready);
            if !before_ready {
                break;
            }
            if seen(&server.name).connected {
                let mut config = server_config(server, settings);
                config.insert("server".into(), json!(server_url));
                let token = format!("K10{hash}::server:{}", secrets.server_token);
                plans.push(draft(
                    server,
                    settings,
                    &versions,
                    &token,
                    Some(&secrets.agent_token),
                    config,
                ));
            }
        }
        // Rule 4.
        for agent in desired.iter().filter(|n| n.role == Role::Agent) {
            if seen(&agent.name).connected {
                let mut config = base_config(agent);
                config.insert("server".into(), json!(server_url));
                let token = format!("K10{hash}::node:{}", secrets.agent_token);
                plans.push(draft(agent, settings, &versions, &token, None, config));
            }
        }
    }
    plans
}

/// The version each node's plan carries now (rule 6).
fn plan_versions(
    desired: &[DesiredNode],
    settings: &ClusterSettings,
    observed: &HashMap<String, Observed>,
) -> HashMap<String, Option<String>> {
    let wanted = settings.version.clone();
    let running = |name: &str| observed.get(name).and_then(|o| o.version.clone());
    let ready = |name: &str| observed.get(name).is_some_and(|o| o.ready);
    // Never installed, or already there: the wanted version.
    let current = |name: &str| running(name).is_none() || running(name) == wanted;
    let mut out = HashMap::new();
    let mut servers_done = true;
    let mut turn_taken = false;
    for node in desired.iter().filter(|n| n.role == Role::Server) {
        let version = if wanted.is_none() || current(&node.name) {
            wanted.clone()
        } else if servers_done && !turn_taken {
            turn_taken = true;
            wanted.clone()
        } else {
            running(&node.name)
        };
        servers_done &= current(&node.name) && ready(&node.name);
        out.insert(node.name.clone(), version);
    }
    for node in desired.iter().filter(|n| n.role == Role::Agent) {
        let version = if wanted.is_none() || current(&node.name) || servers_done {
            wanted.clone()
        } else {
            running(&node.name)
        };
        out.insert(node.name.clone(), version);
    }
    out
}

fn base_config(node: &DesiredNode) -> serde_json::Map<String, Value> {
    let mut config = serde_json::Map::new();
    config.insert("node-name".into(), json!(node.name));
    config.insert("node-ip".into(), json!(node.ip.to_string()));
    config
}

fn server_config(node: &DesiredNode, settings: &ClusterSettings) -> serde_json::Map<String, Value> {
    let mut config = base_config(node);
    config.insert("tls-san".into(), json!([node.ip.to_string()]));
    config.insert("write-kubeconfig-mode".into(), json!("0600"));
    for (key, value) in flags_to_config(&settings.server_flags) {
        merge(&mut config, key, value);
    }
    for (key, value) in &settings.config {
        merge(&mut config, key.clone(), value.clone());
    }
    config
}

fn merge(config: &mut serde_json::Map<String, Value>, key: String, value: Value) {
    match (config.get_mut(&key), value) {
        (Some(Value::Array(existing)), Value::Array(more)) => existing.extend(more),
        (Some(Value::Array(existing)), single) => existing.push(single),
        (_, value) => {
            config.insert(key, value);
        }
    }
}

/// `["--disable", "traefik", "--flannel-backend=none", "--disable-network-policy"]` →
/// `{disable: ["traefik"], flannel-backend: "none", disable-network-policy: true}`.
pub fn flags_to_config(flags: &[String]) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        let Some(flag) = flags[i].strip_prefix("--") else {
            i += 1;
            continue;
        };
        let (key, value) = match flag.split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => {
                let next = flags.get(i + 1).filter(|n| !n.starts_with("--"));
                if next.is_some() {
                    i += 1;
                }
                (flag.to_owned(), next.cloned())
            }
        };
        let value = match value {
            None => Value::Bool(true),
            Some(v) if LIST_KEYS.contains(&key.as_str()) => json!([v]),
            Some(v) => Value::String(v),
        };
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, Value::Array(existing))) => {
                if let Value::Array(more) = value {
                    existing.extend(more);
                }
            }
            _ => out.push((key, value)),
        }
        i += 1;
    }
    out
}

fn draft(
    node: &DesiredNode,
    settings: &ClusterSettings,
    versions: &HashMap<String, Option<String>>,
    token: &str,
    agent_token: Option<&str>,
    config: serde_json::Map<String, Value>,
) -> PlanDraft {
    let role = node.role.as_str();
    let mut body = serde_json::Map::new();
    body.insert("schema".into(), json!(1));
    body.insert("install_revision".into(), json!(settings.install_revision));
    body.insert("role".into(), json!(role));
    let version = versions
        .get(&node.name)
        .cloned()
        .unwrap_or_else(|| settings.version.clone());
    body.insert("version".into(), json!(version));
    body.insert("channel".into(), json!(settings.channel));
    body.insert("installer".into(), settings.installer.clone());
    body.insert("token".into(), json!(token));
    if let Some(agent_token) = agent_token {
        body.insert("agent_token".into(), json!(agent_token));
    }
    body.insert("config".into(), Value::Object(config));
    PlanDraft {
        node: node.name.clone(),
        role: node.role,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, role: Role, last: u8) -> DesiredNode {
        DesiredNode {
            name: name.into(),
            role,
            ip: Ipv4Addr::new(192, 168, 0, last),
        }
    }

    fn settings() -> ClusterSettings {
        ClusterSettings {
            version: Some("v1.31.4+k3s1".into()),
            channel: "stable".into(),
            server_flags: vec!["--disable".into(), "traefik".into()],
            install_revision: 1,
            config: BTreeMap::new(),
            installer: json!({"url": DEFAULT_INSTALLER_URL}),
        }
    }

    fn observed(states: &[(&str, bool, bool)]) -> HashMap<String, Observed> {
        states
            .iter()
            .map(|(n, connected, ready)| {
                (
                    (*n).to_owned(),
                    Observed {
                        connected: *connected,
                        ready: *ready,
                        version: None,
                    },
                )
            })
            .collect()
    }

    fn names(plans: &[PlanDraft]) -> Vec<&str> {
        plans.iter().map(|p| p.node.as_str()).collect()
    }

    #[test]
    fn one_server_two_agents_the_agents_wait_for_a_ready_server() {
        let desired = [
            node("k3s-control", Role::Server, 100),
            node("k3s-node-1", Role::Agent, 101),
            node("k3s-node-2", Role::Agent, 102),
        ];
        let mut secrets = ClusterSecrets::generate();
        let all_connected = observed(&[
            ("k3s-control", true, false),
            ("k3s-node-1", true, false),
            ("k3s-node-2", true, false),
        ]);
        let plans = decide(&desired, &settings(), &secrets, &all_connected);
        assert_eq!(names(&plans), ["k3s-control"]);
        let config = plans[0].config().unwrap();
        assert!(
            config.get("cluster-init").is_none(),
            "a single server needs no etcd"
        );
        assert_eq!(config["disable"], json!(["traefik"]));
        assert_eq!(
            plans[0].token(),
            secrets.server_token,
            "the first server gets the short token"
        );

        // Ready, but no CA hash yet: still nobody else.
        let ready = observed(&[
            ("k3s-control", true, true),
            ("k3s-node-1", true, false),
            ("k3s-node-2", true, false),
        ]);
        assert_eq!(
            names(&decide(&desired, &settings(), &secrets, &ready)),
            ["k3s-control"]
        );

        secrets.ca_hash = Some("ab".repeat(32));
        let plans = decide(&desired, &settings(), &secrets, &ready);
        assert_eq!(names(&plans), ["k3s-control", "k3s-node-1", "k3s-node-2"]);
        for agent in &plans[1..] {
            assert!(
                agent
                    .token()
                    .starts_with(&format!("K10{}::node:", "ab".repeat(32)))
            );
            assert!(
                !agent.token().contains(&secrets.server_token),
                "workers never get the server token"
            );
            assert!(!agent.has_agent_token());
            assert_eq!(
                agent.config().unwrap()["server"],
                json!("https://192.168.0.100:6443")
            );
            assert!(
                agent.config().unwrap().get("disable").is_none(),
                "server flags stay on servers"
            );
        }
    }

    #[test]
    fn three_servers_join_strictly_one_at_a_time() {
        let desired = [
            node("s1", Role::Server, 11),
            node("s2", Role::Server, 12),
            node("s3", Role::Server, 13),
            node("a1", Role::Agent, 21),
            node("a2", Role::Agent, 22),
        ];
        let mut secrets = ClusterSecrets::generate();
        secrets.ca_hash = Some("cd".repeat(32));
        let all = |ready: &[&str]| {
            observed(
                &["s1", "s2", "s3", "a1", "a2"]
                    .iter()
                    .map(|n| (*n, true, ready.contains(n)))
                    .collect::<Vec<_>>(),
            )
        };
        let plans = decide(&desired, &settings(), &secrets, &all(&[]));
        assert_eq!(names(&plans), ["s1"]);
        assert_eq!(plans[0].config().unwrap()["cluster-init"], json!(true));
        // s1 Ready: s2 joins, and the agents go in parallel; s3 waits for s2.
        let plans = decide(&desired, &settings(), &secrets, &all(&["s1"]));
        assert_eq!(names(&plans), ["s1", "s2", "a1", "a2"]);
        let s2 = &plans[1];
        assert!(
            s2.token().starts_with("K10")
                && s2
                    .token()
                    .ends_with(&format!("::server:{}", secrets.server_token))
        );
        assert!(s2.config().unwrap().get("cluster-init").is_none());
        assert_eq!(
            s2.config().unwrap()["server"],
            json!("https://192.168.0.11:6443")
        );
        let plans = decide(&desired, &settings(), &secrets, &all(&["s1", "s2"]));
        assert_eq!(names(&plans), ["s1", "s2", "s3", "a1", "a2"]);
        // Every server carries the same critical settings and agent token.
        let servers: Vec<_> = plans.iter().filter(|p| p.role == Role::Server).collect();
        for s in &servers {
            assert_eq!(s.config().unwrap()["disable"], json!(["traefik"]));
            assert!(s.has_agent_token());
        }
    }

    #[test]
    fn disconnected_nodes_get_nothing_and_plans_are_stable() {
        let desired = [node("s1", Role::Server, 11)];
        let secrets = ClusterSecrets::generate();
        assert!(decide(&desired, &settings(), &secrets, &HashMap::new()).is_empty());
        let connected = observed(&[("s1", true, false)]);
        let a = decide(&desired, &settings(), &secrets, &connected);
        let b = decide(&desired, &settings(), &secrets, &connected);
        assert_eq!(a[0].digest(), b[0].digest());
        let mut bumped = settings();
        bumped.install_revision = 2;
        assert_ne!(
            decide(&desired, &bumped, &secrets, &connected)[0].digest(),
            a[0].digest()
        );
        let json: Value = serde_json::from_str(&a[0].to_json(7)).unwrap();
        assert_eq!(json["revision"], json!(7));
        assert_eq!(json["schema"], json!(1));
        assert!(!format!("{:?}", a[0]).contains(&secrets.server_token));
        assert!(!format!("{secrets:?}").contains(&secrets.agent_token));
    }

    #[test]
    fn flags_become_config_keys_and_cilium_settings_are_expressible() {
        let flags: Vec<String> = [
            "--disable",
            "traefik",
            "--disable=servicelb",
            "--flannel-backend=none",
            "--disable-network-policy",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let config: BTreeMap<_, _> = flags_to_config(&flags).into_iter().collect();
        assert_eq!(config["disable"], json!(["traefik", "servicelb"]));
        assert_eq!(config["flannel-backend"], json!("none"));
        assert_eq!(config["disable-network-policy"], json!(true));
        let tokens = ClusterSecrets::generate();
        assert_eq!(tokens.server_token.len(), 48);
        assert!(
            tokens
                .server_token
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        );
        assert_ne!(tokens.server_token, tokens.agent_token);
    }

    #[test]
    fn an_installer_file_travels_inline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("install.sh"), "#!/bin/sh\n").unwrap();
        let mut k3s = crate::spec::K3sSpec::default();
        let settings = ClusterSettings::from_spec(&k3s, dir.path()).unwrap();
        assert_eq!(settings.installer, json!({"url": DEFAULT_INSTALLER_URL}));
        k3s.installer_file = Some("install.sh".into());
        let settings = ClusterSettings::from_spec(&k3s, dir.path()).unwrap();
        assert_eq!(settings.installer, json!({"inline": "#!/bin/sh\n"}));
        k3s.installer_file = Some("missing.sh".into());
        assert!(ClusterSettings::from_spec(&k3s, dir.path()).is_err());
    }

    #[test]
    fn an_upgrade_goes_server_by_server_then_to_the_agents() {
        let desired = [
            node("s1", Role::Server, 11),
            node("s2", Role::Server, 12),
            node("a1", Role::Agent, 21),
        ];
        let mut secrets = ClusterSecrets::generate();
        secrets.ca_hash = Some("ef".repeat(32));
        let old = "v1.31.4+k3s1";
        let new = "v1.32.1+k3s1";
        let mut newer = settings();
        newer.version = Some(new.into());
        let state = |running: &[(&str, &str)]| -> HashMap<String, Observed> {
            running
                .iter()
                .map(|(n, v)| {
                    let observed = Observed {
                        connected: true,
                        ready: true,
                        version: Some((*v).to_owned()),
                    };
                    ((*n).to_owned(), observed)
                })
                .collect()
        };
        let version_of = |plans: &[PlanDraft], name: &str| {
            let plan = plans.iter().find(|p| p.node == name).unwrap();
            plan.body["version"].as_str().unwrap().to_owned()
        };
        // Everyone on the old version: only s1 moves.
        let plans = decide(
            &desired,
            &newer,
            &secrets,
            &state(&[("s1", old), ("s2", old), ("a1", old)]),
        );
        assert_eq!(version_of(&plans, "s1"), new);
        assert_eq!(version_of(&plans, "s2"), old);
        assert_eq!(version_of(&plans, "a1"), old);
        // s1 upgraded and Ready: s2's turn; agents still wait.
        let plans = decide(
            &desired,
            &newer,
            &secrets,
            &state(&[("s1", new), ("s2", old), ("a1", old)]),
        );
        assert_eq!(version_of(&plans, "s2"), new);
        assert_eq!(version_of(&plans, "a1"), old);
        // Every server upgraded: the agents follow.
        let plans = decide(
            &desired,
            &newer,
            &secrets,
            &state(&[("s1", new), ("s2", new), ("a1", old)]),
        );
        assert_eq!(version_of(&plans, "a1"), new);
    }
}
