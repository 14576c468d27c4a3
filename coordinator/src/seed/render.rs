//! Renders a node's NoCloud seed from the templates in `cloud-init/`: `user-data`,
//! `meta-data` and `network-config`, plus the agent's `agent.toml` carried inside user-data.
//!
//! Templates use `{{name}}` placeholders. Every value is inserted already quoted for its
//! place (JSON strings are valid YAML and TOML scalars), so no value can change the
//! document's structure. A placeholder without a value, or a value without a placeholder,
//! is an error: templates and code cannot drift apart silently.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use base64::Engine as _;

use super::iso::{self, IsoError, IsoFile};
use crate::pki::NodeName;

const USER_DATA: &str = include_str!("../../../cloud-init/user-data.tmpl");
const META_DATA: &str = include_str!("../../../cloud-init/meta-data.tmpl");
const NETWORK_CONFIG: &str = include_str!("../../../cloud-init/network-config.tmpl");
const AGENT_TOML: &str = include_str!("../../../cloud-init/agent.toml.tmpl");
const AGENT_UNIT: &str = include_str!("../../../agent/systemd/homelab-agent.service");

/// The ISO volume label NoCloud looks for.
pub const VOLUME_ID: &str = "cidata";
/// The name of the agent binary on the seed.
pub const AGENT_FILE: &str = "homelab-agent";

/// What went wrong rendering a seed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("template {template} uses {{{{{name}}}}}, which has no value")]
    MissingValue {
        template: &'static str,
        name: String,
    },
    #[error("template {template} does not use the value {name}")]
    UnusedValue {
        template: &'static str,
        name: String,
    },
    #[error("template {template} has an unterminated placeholder")]
    Unterminated { template: &'static str },
    #[error("the SSH public key {0:?} does not look like one (expected `TYPE BASE64 [COMMENT]`)")]
    BadSshKey(String),
    #[error("failed to build the seed ISO")]
    Iso(#[from] IsoError),
}

/// How the VM's network interface is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceMatch {
    /// By MAC address: exact, and what Proxmox VMs use (net0's MAC is known after a clone).
    Mac(String),
    /// By kernel name, for machines whose MAC is not known in advance.
    Name(String),
}

/// Everything a seed is made of.
#[derive(Clone)]
pub struct SeedInput<'a> {
    pub node: &'a NodeName,
    /// Unique per VM and per render: cloud-init runs per-instance modules only for a new id.
    pub instance_id: &'a str,
    pub user: &'a str,
    pub ssh_public_key: &'a str,
    pub locale: &'a str,
    pub coordinator_url: &'a str,
    pub ca_pem: &'a str,
    /// The one-time enrollment token. Never logged.
    pub token: &'a str,
    pub interface: InterfaceMatch,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: &'a [Ipv4Addr],
    pub search_domain: Option<&'a str>,
}

impl fmt::Debug for SeedInput<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedInput")
            .field("node", &self.node)
            .field("instance_id", &self.instance_id)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A rendered seed. `Debug` hides user-data, which holds the token.
#[derive(Clone)]
pub struct Seed {
    pub user_data: String,
    pub meta_data: String,
    pub network_config: String,
}

impl fmt::Debug for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seed")
            .field("meta_data", &self.meta_data)
            .field("network_config", &self.network_config)
            .field("user_data", &"<redacted: holds the enrollment token>")
            .finish()
    }
}

impl Seed {
    /// Renders the seed for `input`.
    pub fn render(input: &SeedInput<'_>) -> Result<Self, SeedError> {
        let key = input.ssh_public_key.trim();
        let mut words = key.split_whitespace();
        let key_ok = matches!((words.next(), words.next()), (Some(kind), Some(body))
            if (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
                && base64::engine::general_purpose::STANDARD.decode(body).is_ok());
        if !key_ok {
            return Err(SeedError::BadSshKey(key.chars().take(40).collect()));
        }
        let name = input.node.as_str();
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);

        let agent_toml = fill(
            "agent.toml.tmpl",
            AGENT_TOML,
            &[
                ("coordinator_url", quote(input.coordinator_url)),
                ("node_name", quote(name)),
            ],
        )?;
        let user_data = fill(
            "user-data.tmpl",
            USER_DATA,
            &[
                ("node_name", name.to_owned()),
                ("hostname", quote(name)),
                ("locale", quote(input.locale)),
                ("user", quote(input.user)),
                ("ssh_authorized_key", quote(key)),
                ("agent_toml_b64", quote(&b64(&agent_toml))),
                ("ca_pem_b64", quote(&b64(input.ca_pem))),
                ("token_b64", quote(&b64(input.token.trim()))),
                ("agent_unit_b64", quote(&b64(AGENT_UNIT))),
            ],
        )?;
        let meta_data = fill(
            "meta-data.tmpl",
            META_DATA,
            &[
                ("instance_id", quote(input.instance_id)),
                ("hostname", quote(name)),
            ],
        )?;
        let interface_match = match &input.interface {
            InterfaceMatch::Mac(mac) => {
                format!("{{macaddress: {}}}", quote(&mac.to_ascii_lowercase()))
            }
            InterfaceMatch::Name(name) => format!("{{name: {}}}", quote(name)),
        };
        let dns: Vec<String> = input.dns.iter().map(|d| d.to_string()).collect();
        let search: Vec<&str> = input.search_domain.into_iter().collect();
        let network_config = fill(
            "network-config.tmpl",
            NETWORK_CONFIG,
            &[
                ("interface_match", interface_match),
                (
                    "address_cidr",
                    quote(&format!("{}/{}", input.address, input.prefix)),
                ),
                ("gateway", quote(&input.gateway.to_string())),
                ("dns_servers", json(&dns)),
                ("search_domains", json(&search)),
            ],
        )?;
        Ok(Self {
            user_data,
            meta_data,
            network_config,
        })
    }

    /// The seed's files, by their names on the seed.
    pub fn files(&self) -> [(&'static str, &[u8]); 3] {
        [
            ("user-data", self.user_data.as_bytes()),
            ("meta-data", self.meta_data.as_bytes()),
            ("network-config", self.network_config.as_bytes()),
        ]
    }

    /// The seed as an ISO 9660 image labelled `cidata`, carrying the agent binary too.
    pub fn iso(&self, agent_binary: &[u8]) -> Result<Vec<u8>, SeedError> {
        let mut files: Vec<IsoFile<'_>> = self
            .files()
            .into_iter()
            .map(|(name, data)| IsoFile { name, data })
            .collect();
        files.push(IsoFile {
            name: AGENT_FILE,
            data: agent_binary,
        });
        Ok(iso::build(VOLUME_ID, &files)?)
    }
}

/// A JSON string literal: valid as a YAML double-quoted scalar and a TOML basic string.
fn quote(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

fn json<T: serde::Serialize>(value: &T) -> String {
    // Invariant: lists of strings always serialize.
    serde_json::to_string(value).expect("strings serialize")
}

/// Replaces every `{{name}}` in `template`; refuses missing and unused values.
fn fill(
    template_name: &'static str,
    template: &str,
    values: &[(&str, String)],
) -> Result<String, SeedError> {
    let map: BTreeMap<&str, &str> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut used = std::collections::BTreeSet::new();
    let mut out =
        String::with_capacity(template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(SeedError::Unterminated {
            template: template_name,
        })?;
        let name = after[..end].trim();
        let value = map.get(name).ok_or_else(|| SeedError::MissingValue {
            template: template_name,
            name: name.to_owned(),
        })?;
        out.push_str(value);
        used.insert(name.to_owned());
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if let Some((name, _)) = values.iter().find(|(k, _)| !used.contains(*k)) {
        return Err(SeedError::UnusedValue {
            template: template_name,
            name: (*name).to_owned(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4x9kQzCxT5Tn2Z2b6T7hR2JwJxWQm0c1lq0f1p2r3s ops@workstation";

    pub(crate) fn sample() -> (NodeName, Vec<Ipv4Addr>) {
        (
            NodeName::parse("k3s-control").unwrap(),
            vec![Ipv4Addr::new(192, 168, 0, 1)],
        )
    }

    pub(crate) fn input<'a>(node: &'a NodeName, dns: &'a [Ipv4Addr]) -> SeedInput<'a> {
        SeedInput {
            node,
            instance_id: "iid-100-0f1e2d3c",
            user: "ops",
            ssh_public_key: KEY,
            locale: "C.UTF-8",
            coordinator_url: "https://192.168.0.10:7443",
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            token: "hlet_secret-token-value",
            interface: InterfaceMatch::Mac("BC:24:11:5A:3C:7E".into()),
            address: Ipv4Addr::new(192, 168, 0, 100),
            prefix: 24,
            gateway: Ipv4Addr::new(192, 168, 0, 1),
            dns,
            search_domain: None,
        }
    }

    #[test]
    fn every_placeholder_gets_a_value_and_the_token_is_only_encoded() {
        let (node, dns) = sample();
        let seed = Seed::render(&input(&node, &dns)).unwrap();
        for text in [&seed.user_data, &seed.meta_data, &seed.network_config] {
            assert!(!text.contains("{{"), "{text}");
        }
        assert!(seed.user_data.starts_with("#cloud-config\n"));
        assert!(
            !seed.user_data.contains("hlet_secret-token-value"),
            "token travels base64-encoded"
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode("hlet_secret-token-value");
        assert!(seed.user_data.contains(&encoded));
        assert!(seed.meta_data.contains("instance-id: \"iid-100-0f1e2d3c\""));
        assert!(seed.meta_data.contains("local-hostname: \"k3s-control\""));
        assert!(
            seed.network_config
                .contains("macaddress: \"bc:24:11:5a:3c:7e\"")
        );
        assert!(seed.network_config.contains("\"192.168.0.100/24\""));
        assert!(!format!("{seed:?}").contains(&encoded));
    }

    #[test]
    fn the_agent_config_inside_parses_as_the_agent_reads_it() {
        let (node, dns) = sample();
        let seed = Seed::render(&input(&node, &dns)).unwrap();
        let line = seed
            .user_data
            .lines()
            .skip_while(|l| !l.contains("/etc/homelab-agent/agent.toml"))
            .find_map(|l| l.trim().strip_prefix("content: "))
            .unwrap();
        let b64: String = serde_json::from_str(line).unwrap();
        let toml_text = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap();
        let parsed: toml::Table = toml::from_str(&toml_text).unwrap();
        assert_eq!(parsed["node_name"].as_str(), Some("k3s-control"));
        assert_eq!(
            parsed["coordinator_url"].as_str(),
            Some("https://192.168.0.10:7443")
        );
    }

    #[test]
    fn a_bad_ssh_key_is_refused() {
        let (node, dns) = sample();
        let mut bad = input(&node, &dns);
        bad.ssh_public_key = "not a key";
        assert!(matches!(Seed::render(&bad), Err(SeedError::BadSshKey(_))));
    }

    #[test]
    fn templates_and_values_cannot_drift_apart() {
        assert!(matches!(
            fill("t", "{{a}} {{b}}", &[("a", "1".into())]),
            Err(SeedError::MissingValue { .. })
        ));
        assert!(matches!(
            fill("t", "{{a}}", &[("a", "1".into()), ("b", "2".into())]),
            Err(SeedError::UnusedValue { .. })
        ));
        assert!(matches!(
            fill("t", "{{a", &[]),
            Err(SeedError::Unterminated { .. })
        ));
        assert_eq!(fill("t", "x{{ a }}y", &[("a", "1".into())]).unwrap(), "x1y");
    }
}
