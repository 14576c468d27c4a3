//! The agent's configuration: `/etc/homelab-agent/agent.toml`, written by cloud-init.
//!
//! ```toml
//! coordinator_url = "https://192.168.0.10:7443"
//! node_name = "k3s-control"
//! ca_cert = "/etc/homelab-agent/ca.pem"
//! token_file = "/etc/homelab-agent/token"
//! state_dir = "/var/lib/homelab-agent"
//! # K3s (all optional; the defaults suit an Ubuntu or Debian node)
//! systemctl = "/usr/bin/systemctl"
//! journalctl = "/usr/bin/journalctl"
//! command_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
//! k3s_ready_timeout_seconds = 300
//! k3s_install_timeout_seconds = 900
//! installer_ca_bundle = "/etc/ssl/certs/ca-certificates.crt"
//! ```

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Where the agent looks for its configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/homelab-agent/agent.toml";
/// Default location of the pinned CA certificate.
pub const DEFAULT_CA_CERT: &str = "/etc/homelab-agent/ca.pem";
/// Default location of the one-time enrollment token.
pub const DEFAULT_TOKEN_FILE: &str = "/etc/homelab-agent/token";
/// Default state directory: key, certificate, checkpoints.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/homelab-agent";
/// systemctl on Debian and Ubuntu (merged /usr).
pub const DEFAULT_SYSTEMCTL: &str = "/usr/bin/systemctl";
/// journalctl on Debian and Ubuntu; used only to explain a unit that did not come up.
pub const DEFAULT_JOURNALCTL: &str = "/usr/bin/journalctl";
/// The distribution roots Ubuntu and Debian ship (package ca-certificates).
pub const DEFAULT_INSTALLER_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// A first server with embedded etcd is active in about a minute on a small VM; an agent
/// waits for its server. Five minutes leaves room without hiding a node that never comes up.
pub const DEFAULT_K3S_READY_TIMEOUT_SECONDS: u64 = 300;
/// install.sh downloads a binary of about 70 MB: fifteen minutes covers a slow link.
pub const DEFAULT_K3S_INSTALL_TIMEOUT_SECONDS: u64 = 900;

/// What went wrong reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read agent config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid agent config {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid agent config: {0}")]
    Invalid(String),
}

/// The agent's settings. Every path can be overridden on the command line, so tests run
/// unprivileged in a temporary directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The coordinator, as `https://HOST:PORT`; HOST must be a name or address in the
    /// coordinator's serving certificate.
    pub coordinator_url: String,
    /// This node's name; must match the name the enrollment token is bound to.
    pub node_name: String,
    /// The homelab CA certificate (PEM). The agent trusts only this CA: it is pinned.
    #[serde(default = "default_ca_cert")]
    pub ca_cert: PathBuf,
    /// The one-time enrollment token; deleted after a successful enrollment.
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// Where the key, certificate and checkpoints live (created 0700).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Root of the file system the host facts are read from (machine-id, os-release, DMI).
    /// `/` in production; a directory in tests.
    #[serde(default = "default_host_root")]
    pub host_root: PathBuf,
    /// The systemctl binary used to start K3s and read its state.
    #[serde(default = "default_systemctl")]
    pub systemctl: PathBuf,
    /// The journalctl binary; when it does not exist, a K3s unit that fails to come up is
    /// reported without journal lines.
    #[serde(default = "default_journalctl")]
    pub journalctl: PathBuf,
    /// `PATH` for install.sh, systemctl and journalctl, which otherwise get an empty
    /// environment.
    #[serde(default = "default_command_path")]
    pub command_path: String,
    /// How long the K3s unit may take to become active after a start or restart.
    #[serde(default = "default_k3s_ready_timeout_seconds")]
    pub k3s_ready_timeout_seconds: u64,
    /// How long install.sh may run before it is killed.
    #[serde(default = "default_k3s_install_timeout_seconds")]
    pub k3s_install_timeout_seconds: u64,
    /// PEM roots trusted when the install plan names an https installer URL.
    #[serde(default = "default_installer_ca_bundle")]
    pub installer_ca_bundle: PathBuf,
}

fn default_ca_cert() -> PathBuf {
    DEFAULT_CA_CERT.into()
}
fn default_token_file() -> PathBuf {
    DEFAULT_TOKEN_FILE.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_host_root() -> PathBuf {
    "/".into()
}
fn default_systemctl() -> PathBuf {
    DEFAULT_SYSTEMCTL.into()
}
fn default_journalctl() -> PathBuf {
    DEFAULT_JOURNALCTL.into()
}
fn default_command_path() -> String {
    crate::k3s::host::DEFAULT_PATH.into()
}
fn default_k3s_ready_timeout_seconds() -> u64 {
    DEFAULT_K3S_READY_TIMEOUT_SECONDS
}
fn default_k3s_install_timeout_seconds() -> u64 {
    DEFAULT_K3S_INSTALL_TIMEOUT_SECONDS
}
fn default_installer_ca_bundle() -> PathBuf {
    DEFAULT_INSTALLER_CA_BUNDLE.into()
}

impl AgentConfig {
    /// Reads and checks the configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.check()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !self.coordinator_url.starts_with("https://") {
            return Err(ConfigError::Invalid(format!(
                "coordinator_url {:?} must start with https://",
                self.coordinator_url
            )));
        }
        if self.node_name.is_empty() {
            return Err(ConfigError::Invalid("node_name is empty".into()));
        }
        if self.k3s_ready_timeout_seconds == 0 || self.k3s_install_timeout_seconds == 0 {
            return Err(ConfigError::Invalid(
                "k3s_ready_timeout_seconds and k3s_install_timeout_seconds must be positive".into(),
            ));
        }
        if self.command_path.is_empty() {
            return Err(ConfigError::Invalid("command_path is empty".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_refused_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        fs::write(
            &path,
            "coordinator_url = \"https://10.0.0.1:7443\"\nnode_name = \"n\"\ntoken = \"x\"\n",
        )
        .unwrap();
        let err = AgentConfig::from_file(&path).unwrap_err();
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(text.contains("token"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn defaults_fill_paths() {
        let config: AgentConfig =
            toml::from_str("coordinator_url = \"https://c:1\"\nnode_name = \"n\"").unwrap();
        assert_eq!(config.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(config.host_root, PathBuf::from("/"));
        assert_eq!(config.systemctl, PathBuf::from(DEFAULT_SYSTEMCTL));
        assert_eq!(
            config.k3s_ready_timeout_seconds,
            DEFAULT_K3S_READY_TIMEOUT_SECONDS
        );
        config.check().unwrap();
    }

    #[test]
    fn a_zero_k3s_timeout_is_refused() {
        let config: AgentConfig = toml::from_str(
            "coordinator_url = \"https://c:1\"\nnode_name = \"n\"\nk3s_ready_timeout_seconds = 0",
        )
        .unwrap();
        assert!(config.check().is_err());
    }
}
