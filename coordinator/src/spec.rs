//! The cluster spec, `homelab.toml`: what the operator wants. Parsed strictly: unknown keys
//! are refused, and every error names the key and its line.
//!
//! Secrets are never in the spec: the Proxmox API token secret comes from an environment
//! variable or a file that the spec names.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use crate::pki::NodeName;

/// The default bridge of a Proxmox VE host.
pub const DEFAULT_BRIDGE: &str = "vmbr0";
/// Default server flags: this homelab runs its own ingress, so K3s's Traefik is off.
pub const DEFAULT_SERVER_FLAGS: &[&str] = &["--disable", "traefik"];
/// Where the operator's SSH public key usually is.
pub const DEFAULT_SSH_KEY: &str = "~/.ssh/id_ed25519.pub";

/// What is wrong with a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("failed to read the spec {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type, a missing or an unknown key; the message names the key and
    /// shows the line.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// A value that parses but makes no sense.
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

/// The whole spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// How to reach and use the Proxmox VE host.
    pub proxmox: ProxmoxSpec,
    /// The LAN the VMs live on.
    pub network: NetworkSpec,
    /// The operator's access to the VMs.
    #[serde(default)]
    pub access: AccessSpec,
    /// The coordinator as the VMs reach it.
    pub coordinator: CoordinatorSpec,
    /// K3s settings shared by every node.
    #[serde(default)]
    pub k3s: K3sSpec,
    /// The VMs, in order.
    #[serde(rename = "vm")]
    pub vms: Vec<VmSpec>,
}

/// `[proxmox]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxSpec {
    /// `https://HOST:8006`.
    pub endpoint: Spanned<String>,
    /// The Proxmox node the VMs are created on (the template's node).
    pub node: String,
    /// API token id, `USER@REALM!TOKENID`.
    pub token_id: Spanned<String>,
    /// Environment variable holding the token secret.
    pub token_secret_env: Option<String>,
    /// File holding the token secret.
    pub token_secret_file: Option<PathBuf>,
    /// Trust: the Proxmox CA (`/etc/pve/pve-root-ca.pem`).
    pub ca_file: Option<PathBuf>,
    /// Trust: the SHA-256 fingerprint of the host's certificate, `AA:BB:…`.
    pub fingerprint: Option<Spanned<String>>,
    /// The cloud-init template, by name or VMID.
    pub template: TemplateRef,
    /// Linked (fast, default) or full clones.
    #[serde(default)]
    pub clone: CloneMode,
    /// Storage for full clones; linked clones stay on the template's storage.
    pub vm_storage: Option<String>,
    /// Path-based storage with `iso` content for the seed images.
    pub iso_storage: String,
}

/// A template named by its VM name or its VMID.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TemplateRef {
    Vmid(u32),
    Name(String),
}

impl fmt::Display for TemplateRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vmid(id) => write!(f, "VMID {id}"),
            Self::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// How VMs are cloned from the template.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    #[default]
    Linked,
    Full,
}

/// `[network]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// The bridge every VM's net0 attaches to.
    #[serde(default = "default_bridge")]
    pub bridge: String,
    /// The LAN, for example `192.168.0.0/24`.
    pub cidr: Spanned<String>,
    /// The default gateway.
    pub gateway: Spanned<Ipv4Addr>,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
    /// DNS search domain.
    pub search_domain: Option<String>,
}

fn default_bridge() -> String {
    DEFAULT_BRIDGE.to_owned()
}

/// `[access]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSpec {
    /// The operator's login on every VM.
    #[serde(default = "default_user")]
    pub user: String,
    /// The operator's SSH public key file (`~` is expanded).
    #[serde(default = "default_ssh_key")]
    pub ssh_public_key: PathBuf,
    /// The system locale; `C.UTF-8` works on minimal images.
    #[serde(default = "default_locale")]
    pub locale: String,
}

impl Default for AccessSpec {
    fn default() -> Self {
        Self {
            user: default_user(),
            ssh_public_key: default_ssh_key(),
            locale: default_locale(),
        }
    }
}

fn default_user() -> String {
    "ops".to_owned()
}
fn default_ssh_key() -> PathBuf {
    DEFAULT_SSH_KEY.into()
}
fn default_locale() -> String {
    "C.UTF-8".to_owned()
}

/// `[coordinator]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSpec {
    /// The URL agents dial, `https://HOST:PORT`; HOST must be in the serving certificate
    /// (`homelab init --san HOST`).
    pub url: Spanned<String>,
}

/// `[k3s]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K3sSpec {
    /// An exact version such as `v1.31.4+k3s1`; wins over `channel`.
    pub version: Option<String>,
    /// A release channel such as `stable`, used when no version is pinned.
    #[serde(default = "default_channel")]
    pub channel: String,
    /// Extra arguments for servers, `INSTALL_K3S_EXEC`-style.
    #[serde(default = "default_server_flags")]
    pub server_flags: Vec<String>,
    /// Bump to reinstall K3s on every node without touching the VMs.
    #[serde(default)]
    pub install_revision: u64,
    /// Extra keys for `/etc/rancher/k3s/config.yaml`, for example `flannel-backend = "none"`.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
    /// Where nodes get install.sh: a URL (default `https://get.k3s.io`).
    pub installer_url: Option<String>,
    /// Or a copy of install.sh on this workstation, sent to the nodes by the coordinator over
    /// their links, for homelabs without internet access.
    pub installer_file: Option<PathBuf>,
}

impl Default for K3sSpec {
    fn default() -> Self {
        Self {
            version: None,
            channel: default_channel(),
            server_flags: default_server_flags(),
            install_revision: 0,
            config: BTreeMap::new(),
            installer_url: None,
            installer_file: None,
        }
    }
}

fn default_channel() -> String {
    "stable".to_owned()
}
fn default_server_flags() -> Vec<String> {
    DEFAULT_SERVER_FLAGS
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

/// A node's K3s role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Agent,
}

impl Role {
    /// The role's name, as K3s and the state database spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Agent => "agent",
        }
    }

    /// The role named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "server" => Some(Self::Server),
            "agent" => Some(Self::Agent),
            _ => None,
        }
    }
}

/// Whether a VM should be running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    #[default]
    Running,
    Stopped,
}

/// One `[[vm]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM and node name: a DNS label.
    pub name: Spanned<String>,
    pub role: Role,
    pub cores: Spanned<u32>,
    /// Memory in MiB.
    pub memory: Spanned<u32>,
    /// The boot disk's size, for example `32G`; absent keeps the template's size.
    pub disk: Option<Spanned<String>>,
    /// The static IPv4 address inside `network.cidr`.
    pub ip: Spanned<Ipv4Addr>,
    #[serde(default)]
    pub vm_state: VmState,
}

impl VmSpec {
    /// The validated node name. [`Spec::parse`] has checked it.
    pub fn node_name(&self) -> NodeName {
        // Invariant: `Spec::parse` rejects a spec whose VM names are not node names.
        NodeName::parse(self.name.get_ref()).expect("validated by Spec::parse")
    }
}

/// A parsed IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// Parses `A.B.C.D/N`.
    pub fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = text.split_once('/')?;
        let address: Ipv4Addr = address.parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        (prefix <= 32).then_some(Self { address, prefix })
    }

    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// Whether `ip` is inside the network.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.address) & self.mask()
    }
}

impl Spec {
    /// Reads and validates the spec at `path`.
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates spec text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SpecError> {
        let spec: Spec = toml::from_str(text).map_err(|e| SpecError::Parse {
            path: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |span: Range<usize>, key: &str, message: String| SpecError::Invalid {
            path: origin.to_owned(),
            line: line_of(text, span.start),
            key: key.to_owned(),
            message,
        };

        let endpoint = &spec.proxmox.endpoint;
        if !endpoint.get_ref().starts_with("https://") {
            return Err(invalid(
                endpoint.span(),
                "proxmox.endpoint",
                format!("{:?} must start with https://", endpoint.get_ref()),
            ));
        }
        let token = &spec.proxmox.token_id;
        if !token.get_ref().contains('@') || !token.get_ref().contains('!') {
            return Err(invalid(
                token.span(),
                "proxmox.token_id",
                format!("{:?} is not USER@REALM!TOKENID", token.get_ref()),
            ));
        }
        match (
            &spec.proxmox.token_secret_env,
            &spec.proxmox.token_secret_file,
        ) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(invalid(
                    token.span(),
                    "proxmox.token_secret_env",
                    "set exactly one of token_secret_env and token_secret_file: the secret never goes in the spec".into(),
                ));
            }
            _ => {}
        }
        if let Some(fp) = &spec.proxmox.fingerprint
            && parse_fingerprint(fp.get_ref()).is_none()
        {
            return Err(invalid(
                fp.span(),
                "proxmox.fingerprint",
                "expected 32 hex bytes separated by ':' (AA:BB:…), as `pvenode cert info` prints"
                    .into(),
            ));
        }
        let url = &spec.coordinator.url;
        if !url.get_ref().starts_with("https://") {
            return Err(invalid(
                url.span(),
                "coordinator.url",
                format!("{:?} must start with https://", url.get_ref()),
            ));
        }

        let cidr = &spec.network.cidr;
        let net = Ipv4Net::parse(cidr.get_ref()).ok_or_else(|| {
            invalid(
                cidr.span(),
                "network.cidr",
                format!(
                    "{:?} is not an IPv4 network such as 192.168.0.0/24",
                    cidr.get_ref()
                ),
            )
        })?;
        if !(8..=32).contains(&net.prefix) {
            return Err(invalid(
                cidr.span(),
                "network.cidr",
                "the prefix must be between 8 and 32".into(),
            ));
        }
        let gateway = &spec.network.gateway;
        if !net.contains(*gateway.get_ref()) {
            return Err(invalid(
                gateway.span(),
                "network.gateway",
                format!("{} is outside {}", gateway.get_ref(), cidr.get_ref()),
            ));
        }

        if spec.vms.is_empty() {
            return Err(SpecError::Invalid {
                path: origin.to_owned(),
                line: line_of(text, text.len()),
                key: "vm".into(),
                message: "the spec declares no [[vm]]".into(),
            });
        }
        if !spec.vms.iter().any(|vm| vm.role == Role::Server) {
            return Err(invalid(
                spec.vms[0].name.span(),
                "vm.role",
                "at least one VM must have role = \"server\"".into(),
            ));
        }
        let mut names = BTreeSet::new();
        let mut ips = BTreeSet::new();
        for (i, vm) in spec.vms.iter().enumerate() {
            let key = |field: &str| format!("vm[{i}].{field}");
            if let Err(e) = NodeName::parse(vm.name.get_ref()) {
                return Err(invalid(vm.name.span(), &key("name"), e.to_string()));
            }
            if !names.insert(vm.name.get_ref().clone()) {
                return Err(invalid(
                    vm.name.span(),
                    &key("name"),
                    format!("{:?} is declared twice", vm.name.get_ref()),
                ));
            }
            let ip = *vm.ip.get_ref();
            if !net.contains(ip) {
                return Err(invalid(
                    vm.ip.span(),
                    &key("ip"),
                    format!("{ip} is outside {}", cidr.get_ref()),
                ));
            }
            if ip == *gateway.get_ref() || !ips.insert(ip) {
                return Err(invalid(
                    vm.ip.span(),
                    &key("ip"),
                    format!("{ip} is already used by the gateway or another VM"),
                ));
            }
            if *vm.cores.get_ref() == 0 || *vm.cores.get_ref() > 128 {
                return Err(invalid(
                    vm.cores.span(),
                    &key("cores"),
                    "must be between 1 and 128".into(),
                ));
            }
            if *vm.memory.get_ref() < 512 {
                return Err(invalid(
                    vm.memory.span(),
                    &key("memory"),
                    format!(
                        "{} MiB is too little for K3s; give at least 512 (memory is in MiB)",
                        vm.memory.get_ref()
                    ),
                ));
            }
            if let Some(disk) = &vm.disk
                && parse_size_gib(disk.get_ref()).is_none()
            {
                return Err(invalid(
                    disk.span(),
                    &key("disk"),
                    format!("{:?} is not a size such as 32G", disk.get_ref()),
                ));
            }
        }
        Ok(spec)
    }

    /// The network as parsed. [`Spec::parse`] has checked it.
    pub fn net(&self) -> Ipv4Net {
        // Invariant: `Spec::parse` rejects a spec whose cidr does not parse.
        Ipv4Net::parse(self.network.cidr.get_ref()).expect("validated by Spec::parse")
    }

    /// Looks a VM up by name.
    pub fn vm(&self, name: &str) -> Option<&VmSpec> {
        self.vms.iter().find(|vm| vm.name.get_ref() == name)
    }
}

/// Parses `AA:BB:…` (32 bytes) into bytes.
pub fn parse_fingerprint(text: &str) -> Option<Vec<u8>> {
    let bytes: Option<Vec<u8>> = text
        .split(':')
        .map(|b| {
            (b.len() == 2)
                .then(|| u8::from_str_radix(b, 16).ok())
                .flatten()
        })
        .collect();
    bytes.filter(|b| b.len() == 32)
}

/// Parses a disk size `N[G|T]` into GiB.
pub fn parse_size_gib(text: &str) -> Option<u64> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    match unit {
        "G" => Some(n),
        "T" => n.checked_mul(1024),
        _ => None,
    }
    .filter(|n| *n > 0)
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The commented example spec `homelab init` writes: the first user's homelab.
pub const EXAMPLE: &str = include_str!("../homelab.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_spec_parses_and_describes_this_homelab() {
        let spec = Spec::parse(EXAMPLE, "homelab.toml").unwrap();
        assert_eq!(
            spec.proxmox.endpoint.get_ref(),
            "https://192.168.0.250:8006"
        );
        assert_eq!(
            spec.proxmox.template,
            TemplateRef::Name("ubuntu-noble".into())
        );
        assert_eq!(spec.network.bridge, "vmbr0");
        assert_eq!(
            spec.network.gateway.get_ref(),
            &Ipv4Addr::new(192, 168, 0, 1)
        );
        let vms: Vec<_> = spec
            .vms
            .iter()
            .map(|v| {
                (
                    v.name.get_ref().as_str(),
                    *v.cores.get_ref(),
                    *v.memory.get_ref(),
                    v.ip.get_ref().to_string(),
                )
            })
            .collect();
        assert_eq!(
            vms,
            [
                ("k3s-control", 2, 4096, "192.168.0.100".to_owned()),
                ("k3s-node-1", 2, 4096, "192.168.0.101".to_owned()),
                ("k3s-node-2", 2, 2048, "192.168.0.102".to_owned()),
            ]
        );
        assert_eq!(spec.k3s.server_flags, ["--disable", "traefik"]);
    }

    fn with(replace: &str, by: &str) -> Result<Spec, SpecError> {
        assert!(EXAMPLE.contains(replace), "{replace}");
        Spec::parse(&EXAMPLE.replacen(replace, by, 1), "homelab.toml")
    }

    #[test]
    fn unknown_keys_are_refused_with_key_and_line() {
        let err = with("cores = 2", "cores = 2\ncpus = 4")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cpus"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let err = with("ip = \"192.168.0.101\"", "ip = \"10.0.0.5\"").unwrap_err();
        let SpecError::Invalid { key, line, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(key, "vm[1].ip");
        let expected = EXAMPLE
            .lines()
            .position(|l| l.contains("192.168.0.101"))
            .unwrap()
            + 1;
        assert_eq!(*line, expected, "{err}");
        assert!(err.to_string().contains("outside 192.168.0.0/24"), "{err}");

        let err = with("name = \"k3s-node-2\"", "name = \"k3s-node-1\"").unwrap_err();
        assert!(err.to_string().contains("declared twice"), "{err}");
        let err = with("name = \"k3s-node-2\"", "name = \"K3S_NODE\"").unwrap_err();
        assert!(err.to_string().contains("vm[2].name"), "{err}");
        let err = with("memory = 2048", "memory = 2").unwrap_err();
        assert!(err.to_string().contains("MiB"), "{err}");
    }

    /// Each bad input, the key the error must name, and words the message must contain.
    #[test]
    fn bad_specs_are_refused_with_precise_messages() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "endpoint = \"https://192.168.0.250:8006\"",
                "endpoint = \"http://192.168.0.250:8006\"",
                "proxmox.endpoint",
                "must start with https://",
            ),
            (
                "token_id = \"homelab@pve!coordinator\"",
                "token_id = \"homelab\"",
                "proxmox.token_id",
                "USER@REALM!TOKENID",
            ),
            (
                "token_secret_env = \"HOMELAB_PROXMOX_TOKEN\"",
                "token_secret_env = \"X\"\ntoken_secret_file = \"f\"",
                "proxmox.token_secret_env",
                "exactly one",
            ),
            (
                "# fingerprint = \"AA:BB:…\"",
                "fingerprint = \"AA:BB\"",
                "proxmox.fingerprint",
                "32 hex bytes",
            ),
            (
                "cidr = \"192.168.0.0/24\"",
                "cidr = \"192.168.0.0\"",
                "network.cidr",
                "not an IPv4 network",
            ),
            (
                "cidr = \"192.168.0.0/24\"",
                "cidr = \"192.168.0.0/4\"",
                "network.cidr",
                "between 8 and 32",
            ),
            (
                "gateway = \"192.168.0.1\"",
                "gateway = \"10.0.0.1\"",
                "network.gateway",
                "outside",
            ),
            (
                "url = \"https://192.168.0.10:7443\"",
                "url = \"192.168.0.10:7443\"",
                "coordinator.url",
                "https://",
            ),
            (
                "role = \"server\"",
                "role = \"agent\"",
                "vm.role",
                "at least one",
            ),
            (
                "ip = \"192.168.0.102\"",
                "ip = \"192.168.0.100\"",
                "vm[2].ip",
                "already used",
            ),
            (
                "ip = \"192.168.0.102\"",
                "ip = \"192.168.0.1\"",
                "vm[2].ip",
                "already used",
            ),
            ("cores = 2", "cores = 0", "vm[0].cores", "between 1 and 128"),
            (
                "memory = 2048",
                "memory = 2048\ndisk = \"32\"",
                "vm[2].disk",
                "not a size",
            ),
        ];
        for (find, replace, key, words) in cases {
            let Err(err) = with(find, replace) else {
                panic!("{replace:?} was accepted")
            };
            let text = err.to_string();
            assert!(text.contains(key), "{replace:?}: {text} should name {key}");
            assert!(
                text.contains(words),
                "{replace:?}: {text} should say {words:?}"
            );
            assert!(text.starts_with("homelab.toml:"), "{text} names the file");
        }
        // Syntax and type errors come from the TOML parser, with line and key.
        for (find, replace, words) in [
            ("cores = 2", "cores = \"two\"", "invalid type"),
            ("role = \"agent\"", "role = \"worker\"", "unknown variant"),
            (
                "[network]",
                "[network]\nbridges = 1",
                "unknown field `bridges`",
            ),
            (
                "memory = 4096",
                "memory = 4096\nmemory = 1",
                "duplicate key",
            ),
        ] {
            let text = with(find, replace).unwrap_err().to_string();
            assert!(
                text.contains(words) && text.contains("line"),
                "{replace:?}: {text}"
            );
        }
    }

    #[test]
    fn the_secret_never_sits_in_the_spec() {
        let err = with("token_secret_env", "token_secret")
            .unwrap_err()
            .to_string();
        assert!(err.contains("token_secret"), "{err}");
    }

    #[test]
    fn k3s_settings_for_cilium_are_expressible() {
        let spec = with(
            "[k3s]",
            "[k3s]\nconfig = { flannel-backend = \"none\", disable-network-policy = true }",
        )
        .unwrap();
        assert_eq!(spec.k3s.config["flannel-backend"].as_str(), Some("none"));
    }

    #[test]
    fn networks_contain_their_addresses() {
        let net = Ipv4Net::parse("192.168.0.0/24").unwrap();
        assert!(net.contains("192.168.0.254".parse().unwrap()));
        assert!(!net.contains("192.168.1.1".parse().unwrap()));
        assert!(Ipv4Net::parse("192.168.0.0").is_none());
        assert_eq!(parse_size_gib("32G"), Some(32));
        assert_eq!(parse_size_gib("1T"), Some(1024));
        assert_eq!(parse_size_gib("32"), None);
        assert!(parse_fingerprint(&["AB"; 32].join(":")).is_some());
        assert!(parse_fingerprint("AB:CD").is_none());
    }
}
