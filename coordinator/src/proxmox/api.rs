//! Typed wrappers over [`Client::call`], one per endpoint the coordinator uses, plus the
//! task waiter, the lock waiter and the VMID allocator.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use tokio::{sync::Mutex, time::Instant};
use tracing::{debug, info};

use super::{
    ApiErrorKind, ProxmoxError, Upid,
    client::{Client, Idempotency, segment},
    de,
};

/// A VM as `GET /cluster/resources?type=vm` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct VmResource {
    #[serde(deserialize_with = "de::u64_lenient")]
    pub vmid: u64,
    #[serde(default)]
    pub name: Option<String>,
    pub node: String,
    #[serde(default)]
    pub status: String,
    #[serde(default, deserialize_with = "de::bool_lenient")]
    pub template: bool,
    #[serde(default)]
    pub lock: Option<String>,
}

/// `GET …/status/current`.
#[derive(Debug, Clone, Deserialize)]
pub struct VmStatus {
    pub status: String,
    #[serde(default)]
    pub lock: Option<String>,
}

/// A VM's configuration: key → value, as the server returns it (values are strings or
/// numbers; read them through the helpers).
#[derive(Debug, Clone, Default)]
pub struct VmConfig(pub BTreeMap<String, Value>);

impl VmConfig {
    /// A key's value as text, whatever JSON type it came as.
    pub fn text(&self, key: &str) -> Option<String> {
        self.0.get(key).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }

    /// A numeric key, leniently (`"2048"`, `2048`, `"current=2048"`).
    pub fn number(&self, key: &str) -> Option<u64> {
        let text = self.text(key)?;
        let first = text.split(',').next()?;
        let value = first.strip_prefix("current=").unwrap_or(first);
        value.trim().parse().ok()
    }

    /// The config digest, for optimistic concurrency.
    pub fn digest(&self) -> Option<String> {
        self.text("digest")
    }

    /// The MAC address of `net0`.
    pub fn net0_mac(&self) -> Option<String> {
        let net0 = self.text("net0")?;
        net0.split(',').find_map(|part| {
            let (model, mac) = part.split_once('=')?;
            matches!(
                model,
                "virtio" | "e1000" | "rtl8139" | "vmxnet3" | "macaddr"
            )
            .then(|| mac.to_ascii_lowercase())
        })
    }
}

/// A volume on a storage.
#[derive(Debug, Clone, Deserialize)]
pub struct Volume {
    pub volid: String,
    #[serde(default)]
    pub content: String,
}

/// A finished, successful task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskOutcome {
    /// `WARNINGS: n` when the task succeeded with warnings.
    pub warnings: Option<String>,
}

#[derive(Debug, Deserialize)]
struct TaskStatus {
    status: String,
    #[serde(default)]
    exitstatus: Option<String>,
}

/// Parameters of a clone.
#[derive(Debug, Clone)]
pub struct CloneRequest<'a> {
    /// The template's node: clones must be sent there.
    pub node: &'a str,
    pub template_vmid: u64,
    pub new_vmid: u64,
    pub name: &'a str,
    pub full: bool,
    /// Target storage, for full clones only.
    pub storage: Option<&'a str>,
    pub description: &'a str,
}

impl Client {
    /// `GET /version`: the server's version string.
    pub async fn version(&self) -> Result<String, ProxmoxError> {
        let data = self
            .call(Method::GET, "/version", &[], Idempotency::Safe)
            .await?;
        Ok(data
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned())
    }

    /// Every VM the token may see, on every node.
    pub async fn vm_resources(&self) -> Result<Vec<VmResource>, ProxmoxError> {
        let data = self
            .call(
                Method::GET,
                "/cluster/resources",
                &[("type", "vm".into())],
                Idempotency::Safe,
            )
            .await?;
        decode("/cluster/resources", data)
    }

    /// `GET /cluster/nextid[?vmid=N]`: a free VMID (as a string, despite the schema), or an
    /// `Invalid` error when `vmid` is taken.
    async fn nextid(&self, vmid: Option<u64>) -> Result<u64, ProxmoxError> {
        let params: Vec<(&str, String)> =
            vmid.map(|v| ("vmid", v.to_string())).into_iter().collect();
        let data = self
            .call(Method::GET, "/cluster/nextid", &params, Idempotency::Safe)
            .await?;
        de::value_to_u64(&data).map_err(|detail| ProxmoxError::Decode {
            method: "GET".into(),
            path: "/cluster/nextid".into(),
            detail,
        })
    }

    /// Starts a clone and returns its `qmclone` task.
    pub async fn clone_vm(&self, request: &CloneRequest<'_>) -> Result<Upid, ProxmoxError> {
        let path = format!(
            "/nodes/{}/qemu/{}/clone",
            segment(request.node),
            request.template_vmid
        );
        let mut params = vec![
            ("newid", request.new_vmid.to_string()),
            ("name", request.name.to_owned()),
            ("full", if request.full { "1" } else { "0" }.to_owned()),
            ("description", request.description.to_owned()),
        ];
        if let (true, Some(storage)) = (request.full, request.storage) {
            params.push(("storage", storage.to_owned()));
        }
        let data = self
            .call(Method::POST, &path, &params, Idempotency::Unsafe)
            .await?;
        upid(&path, data)
    }

    /// Waits for a task to stop; a failure carries the task's exit status verbatim and the
    /// end of its log.
    pub async fn wait_task(
        &self,
        upid: &Upid,
        timeout: Duration,
    ) -> Result<TaskOutcome, ProxmoxError> {
        let path = format!(
            "/nodes/{}/tasks/{}/status",
            segment(&upid.node),
            segment(upid.as_str())
        );
        let deadline = Instant::now() + timeout;
        let mut delay = self.task_poll;
        let mut unseen = 0;
        loop {
            match self.call(Method::GET, &path, &[], Idempotency::Safe).await {
                Ok(data) => {
                    let status: TaskStatus = decode(&path, data)?;
                    if status.status == "stopped" {
                        let exit = status
                            .exitstatus
                            .unwrap_or_else(|| "unexpected status".into());
                        if exit == "OK" {
                            return Ok(TaskOutcome { warnings: None });
                        }
                        if exit
                            .strip_prefix("WARNINGS: ")
                            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                        {
                            return Ok(TaskOutcome {
                                warnings: Some(exit),
                            });
                        }
                        let log = self.task_log_tail(upid).await.unwrap_or_default();
                        return Err(ProxmoxError::TaskFailed {
                            upid: upid.to_string(),
                            exitstatus: exit,
                            log,
                        });
                    }
                }
                // A brand-new task can be invisible for a moment.
                Err(e) if e.kind() == Some(ApiErrorKind::Invalid) && unseen < 5 => unseen += 1,
                Err(e) => return Err(e),
            }
            if Instant::now() + delay > deadline {
                return Err(ProxmoxError::TaskTimeout {
                    upid: upid.to_string(),
                    timeout,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 3 / 2).min(self.task_poll * 4);
        }
    }

    async fn task_log_tail(&self, upid: &Upid) -> Result<Vec<String>, ProxmoxError> {
        let path = format!(
            "/nodes/{}/tasks/{}/log",
            segment(&upid.node),
            segment(upid.as_str())
        );
        let data = self
            .call(
                Method::GET,
                &path,
                &[("start", "0".into()), ("limit", "500".into())],
                Idempotency::Safe,
            )
            .await?;
        let lines: Vec<String> = data
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.get("t").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let skip = lines.len().saturating_sub(50);
        Ok(lines.into_iter().skip(skip).collect())
    }

    /// `GET …/status/current`.
    pub async fn vm_status(&self, node: &str, vmid: u64) -> Result<VmStatus, ProxmoxError> {
        let path = format!("/nodes/{}/qemu/{vmid}/status/current", segment(node));
        let data = self
            .call(Method::GET, &path, &[], Idempotency::Safe)
            .await?;
        decode(&path, data)
    }

    /// Waits until the VM carries no lock (a finished clone releases it).
    pub async fn wait_unlocked(
        &self,
        node: &str,
        vmid: u64,
        timeout: Duration,
    ) -> Result<(), ProxmoxError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.vm_status(node, vmid).await?;
            let Some(lock) = status.lock.filter(|l| !l.is_empty()) else {
                return Ok(());
            };
            if Instant::now() + self.task_poll > deadline {
                return Err(ProxmoxError::StillLocked {
                    vmid: u32::try_from(vmid).unwrap_or(u32::MAX),
                    lock,
                    timeout,
                });
            }
            debug!(vmid, lock, "VM still locked");
            tokio::time::sleep(self.task_poll).await;
        }
    }

    /// `GET …/config` (pending values win, as the server defaults).
    pub async fn vm_config(&self, node: &str, vmid: u64) -> Result<VmConfig, ProxmoxError> {
        let path = format!("/nodes/{}/qemu/{vmid}/config", segment(node));
        let data = self
            .call(Method::GET, &path, &[], Idempotency::Safe)
            .await?;
        let map: BTreeMap<String, Value> = decode(&path, data)?;
        Ok(VmConfig(map))
    }

    /// `PUT …/config`, synchronous. Pass `digest` to fail if someone else changed the VM.
    pub async fn set_vm_config(
        &self,
        node: &str,
        vmid: u64,
        params: &[(&str, String)],
    ) -> Result<(), ProxmoxError> {
        let path = format!("/nodes/{}/qemu/{vmid}/config", segment(node));
        self.call(Method::PUT, &path, params, Idempotency::Safe)
            .await?;
        Ok(())
    }

    /// `PUT …/firewall/options`: enables the VM's firewall.
    pub async fn enable_firewall(&self, node: &str, vmid: u64) -> Result<(), ProxmoxError> {
        let path = format!("/nodes/{}/qemu/{vmid}/firewall/options", segment(node));
        self.call(
            Method::PUT,
            &path,
            &[("enable", "1".into())],
            Idempotency::Safe,
        )
        .await?;
        Ok(())
    }

    /// `GET …/firewall/options`: whether the VM's firewall is enabled.
    pub async fn firewall_enabled(&self, node: &str, vmid: u64) -> Result<bool, ProxmoxError> {
        let path = format!("/nodes/{}/qemu/{vmid}/firewall/options", segment(node));
        let data = self
            .call(Method::GET, &path, &[], Idempotency::Safe)
            .await?;
        Ok(data
            .get("enable")
            .is_some_and(|v| de::value_to_u64(v).is_ok_and(|n| n == 1) || v == &Value::Bool(true)))
    }

    /// `PUT …/resize` to an absolute size; a task on PVE 8+, nothing before.
    pub async fn resize(
        &self,
        node: &str,
        vmid: u64,
        disk: &str,
        size: &str,
    ) -> Result<Option<Upid>, ProxmoxError> {
        let path = format!("/nodes/{}/qemu/{vmid}/resize", segment(node));
        let data = self
            .call(
                Method::PUT,
                &path,
                &[("disk", disk.to_owned()), ("size", size.to_owned())],
                Idempotency::Safe,
            )
            .await?;
        optional_upid(&path, data)
    }

    /// `POST …/status/{start|stop|shutdown}`.
    pub async fn power(
        &self,
        node: &str,
        vmid: u64,
        action: PowerAction,
    ) -> Result<Upid, ProxmoxError> {
        let path = format!(
            "/nodes/{}/qemu/{vmid}/status/{}",
            segment(node),
            action.as_str()
        );
        let params: Vec<(&str, String)> = match action {
            PowerAction::Shutdown => vec![("forceStop", "1".into()), ("timeout", "60".into())],
            _ => vec![],
        };
        let data = self
            .call(Method::POST, &path, &params, Idempotency::Unsafe)
            .await?;
        upid(&path, data)
    }

    /// `DELETE …/qemu/{vmid}?purge=1&destroy-unreferenced-disks=1`. A VM that is already
    /// gone is a success (`None`).
    pub async fn delete_vm(&self, node: &str, vmid: u64) -> Result<Option<Upid>, ProxmoxError> {
        let path = format!("/nodes/{}/qemu/{vmid}", segment(node));
        let params = [
            ("purge", "1".to_owned()),
            ("destroy-unreferenced-disks", "1".to_owned()),
        ];
        match self
            .call(Method::DELETE, &path, &params, Idempotency::Unsafe)
            .await
        {
            Ok(data) => optional_upid(&path, data),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Volumes on a storage, optionally of one content type.
    pub async fn storage_content(
        &self,
        node: &str,
        storage: &str,
        content: Option<&str>,
    ) -> Result<Vec<Volume>, ProxmoxError> {
        let path = format!(
            "/nodes/{}/storage/{}/content",
            segment(node),
            segment(storage)
        );
        let params: Vec<(&str, String)> = content
            .map(|c| ("content", c.to_owned()))
            .into_iter()
            .collect();
        let data = self
            .call(Method::GET, &path, &params, Idempotency::Safe)
            .await?;
        decode(&path, data)
    }

    /// Uploads an ISO image; returns the `imgcopy` task. An existing file is overwritten.
    pub async fn upload_iso(
        &self,
        node: &str,
        storage: &str,
        filename: &str,
        data: Vec<u8>,
    ) -> Result<Upid, ProxmoxError> {
        let path = format!(
            "/nodes/{}/storage/{}/upload",
            segment(node),
            segment(storage)
        );
        let data = self.upload(&path, "iso", filename, data).await?;
        upid(&path, data)
    }

    /// Deletes a volume; one that is already gone is a success.
    pub async fn delete_volume(
        &self,
        node: &str,
        storage: &str,
        volid: &str,
    ) -> Result<Option<Upid>, ProxmoxError> {
        // Everything after content/ is the volume id, slashes included.
        let path = format!(
            "/nodes/{}/storage/{}/content/{}",
            segment(node),
            segment(storage),
            percent_encoding::utf8_percent_encode(volid, VOLID)
        );
        match self
            .call(Method::DELETE, &path, &[], Idempotency::Safe)
            .await
        {
            Ok(data) => optional_upid(&path, data),
            Err(e) if e.is_not_found() || e.to_string().contains("no such volume") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Characters escaped in a volume id; `/` and `:` stay as they are.
const VOLID: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b':')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.');

/// A power action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Start,
    /// ACPI shutdown, forced after 60 s.
    Shutdown,
    /// Hard power-off.
    Stop,
}

impl PowerAction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Shutdown => "shutdown",
            Self::Stop => "stop",
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(path: &str, data: Value) -> Result<T, ProxmoxError> {
    serde_json::from_value(data).map_err(|e| ProxmoxError::Decode {
        method: "GET".into(),
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn upid(path: &str, data: Value) -> Result<Upid, ProxmoxError> {
    optional_upid(path, data)?.ok_or_else(|| ProxmoxError::Decode {
        method: "POST".into(),
        path: path.to_owned(),
        detail: "no task id in the answer".into(),
    })
}

fn optional_upid(path: &str, data: Value) -> Result<Option<Upid>, ProxmoxError> {
    match data {
        Value::Null => Ok(None),
        Value::String(s) => s
            .parse()
            .map(Some)
            .map_err(|e: super::upid::UpidParseError| ProxmoxError::Decode {
                method: "POST".into(),
                path: path.to_owned(),
                detail: e.to_string(),
            }),
        other => Err(ProxmoxError::Decode {
            method: "POST".into(),
            path: path.to_owned(),
            detail: format!("expected a task id, got {other}"),
        }),
    }
}

/// Hands out VMIDs without collisions between concurrent clones of this process, and
/// survives `nextid` races with other clients: each candidate is confirmed with
/// `nextid?vmid=N`, and a clone that still finds the id taken ("already exists") asks again.
#[derive(Debug, Default)]
pub struct VmidAllocator {
    reserved: Mutex<BTreeSet<u64>>,
}

impl VmidAllocator {
    /// Reserves a free VMID.
    pub async fn allocate(&self, client: &Client) -> Result<u64, ProxmoxError> {
        let mut reserved = self.reserved.lock().await;
        let mut candidate = client.nextid(None).await?;
        for _ in 0..1000 {
            if !reserved.contains(&candidate) {
                match client.nextid(Some(candidate)).await {
                    Ok(_) => {
                        reserved.insert(candidate);
                        info!(vmid = candidate, "VMID reserved");
                        return Ok(candidate);
                    }
                    Err(e) if e.kind() == Some(ApiErrorKind::Invalid) => {}
                    Err(e) => return Err(e),
                }
            }
            candidate += 1;
        }
        Err(ProxmoxError::Decode {
            method: "GET".into(),
            path: "/cluster/nextid".into(),
            detail: "no free VMID in 1000 tries".into(),
        })
    }

    /// Releases a reservation once the clone has claimed the id, or failed.
    pub async fn release(&self, vmid: u64) {
        self.reserved.lock().await.remove(&vmid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_are_read_leniently() {
        let config = VmConfig(
            serde_json::from_str(
                r#"{"memory":"2048","cores":2,"net0":"virtio=BC:24:11:5A:3C:7E,bridge=vmbr0,firewall=1","digest":"ab"}"#,
            )
            .unwrap(),
        );
        assert_eq!(config.number("memory"), Some(2048));
        assert_eq!(config.number("cores"), Some(2));
        assert_eq!(config.net0_mac().as_deref(), Some("bc:24:11:5a:3c:7e"));
        assert_eq!(config.digest().as_deref(), Some("ab"));
    }

    #[test]
    fn volume_ids_keep_their_slashes() {
        let encoded =
            percent_encoding::utf8_percent_encode("local:iso/seed-123.iso", VOLID).to_string();
        assert_eq!(encoded, "local:iso/seed-123.iso");
    }
}
