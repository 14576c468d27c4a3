//! Reconciling the spec's VMs with Proxmox: plan, apply (create or adopt), destroy.
//!
//! Rules:
//! 1. A VM is homelab's when its name matches the spec and its description carries the
//!    cluster marker (which includes the CA fingerprint). A same-named VM without the marker
//!    is a conflict: homelab never touches a VM it did not create.
//! 2. Apply creates what is missing and adopts what exists. It reports drift (cores, memory,
//!    IP) and never destroys or rebuilds anything to fix it.
//! 3. A VM whose node has enrolled has its seed (which holds the one-time token) detached
//!    and deleted.
//! 4. Re-applying an applied spec makes no changing call.
//! 5. Destroy stops, deletes and removes the seed of each VM; a VM already gone is success.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Serialize;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::{
    core::{now_unix, now_unix_ms},
    pki::NodeName,
    proxmox::{
        Auth, Client, ClientConfig, CloneRequest, PowerAction, ProxmoxError, Secret, Trust,
        VmConfig, VmResource, VmidAllocator,
    },
    seed::{InterfaceMatch, Seed, SeedError, SeedInput},
    spec::{CloneMode, Spec, TemplateRef, VmSpec, VmState, parse_fingerprint, parse_size_gib},
    state_dir::{StateDir, StateDirError},
    store::{NodeState, StoreError},
    token::EnrollmentToken,
};

/// How long a seed's enrollment token stays valid: long enough for a slow first boot.
pub const SEED_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// At most this many clones run at once: Proxmox serializes allocation per storage with a
/// 10 s lock timeout, so more only produce lock errors.
const CLONE_CONCURRENCY: usize = 2;

/// How often a task's status is polled at first (backing off to 4× this). Each VM waits on a
/// clone, an upload and a start in sequence, and every wait ends at the first poll after the
/// task: at the client's default of 500 ms (up to 2 s) that added about 1.3 s per VM.
const TASK_POLL: Duration = Duration::from_millis(250);

/// Deadlines of the long steps.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub clone: Duration,
    pub unlock: Duration,
    pub upload: Duration,
    pub power: Duration,
    pub delete: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            clone: Duration::from_secs(600),
            unlock: Duration::from_secs(120),
            upload: Duration::from_secs(300),
            power: Duration::from_secs(180),
            delete: Duration::from_secs(300),
        }
    }
}

/// What went wrong reconciling.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("Proxmox")]
    Proxmox(#[from] ProxmoxError),
    #[error("no VM template {0} on the Proxmox host")]
    NoTemplate(String),
    #[error("{name} (VMID {vmid}) is not a template; convert it with `qm template {vmid}`")]
    NotATemplate { name: String, vmid: u64 },
    #[error(
        "the template is on node {actual}, but the spec says proxmox.node = {spec:?}; clones must be made on the template's node"
    )]
    WrongNode { spec: String, actual: String },
    #[error("failed to read the Proxmox token secret from {source_name}")]
    Secret {
        source_name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the environment variable {0} holding the Proxmox token secret is not set")]
    SecretUnset(String),
    #[error(
        "failed to read proxmox.ca_file {path}; copy /etc/pve/pve-root-ca.pem from the host, or set proxmox.fingerprint"
    )]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("seed for {node}")]
    Seed {
        node: String,
        #[source]
        source: SeedError,
    },
    #[error("coordinator state")]
    State(#[from] StateDirError),
    #[error("coordinator state database")]
    Store(#[from] StoreError),
    #[error("{name}: {message}")]
    Vm { name: String, message: String },
}

/// One step of progress, for the operator's screen.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub vm: String,
    pub step: &'static str,
    pub message: String,
}

/// A difference between the spec and a VM that apply reports but does not fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub field: &'static str,
    pub spec: String,
    pub actual: String,
}

/// What apply will do with one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Clone, seed, configure, start.
    Create,
    /// It exists and is ours.
    Adopt {
        vmid: u64,
        node: String,
        status: String,
        drift: Vec<Drift>,
        /// Start or stop it to match `vm_state`.
        power: Option<PowerChange>,
        /// Its node enrolled: detach and delete the seed.
        remove_seed: bool,
        /// Its node never enrolled and it carries no seed (an interrupted apply): seed and
        /// configure it as a creation would.
        reseed: bool,
    },
    /// A VM of that name exists but is not homelab's.
    Conflict { vmid: u64, reason: String },
}

/// A power change apply will make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerChange {
    Start,
    Stop,
}

/// The plan for one VM.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedVm {
    pub name: String,
    #[serde(flatten)]
    pub action: Action,
}

/// The plan for the spec.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub template_vmid: u64,
    pub template_node: String,
    pub vms: Vec<PlannedVm>,
}

impl Plan {
    /// Whether applying would change anything.
    pub fn is_noop(&self) -> bool {
        self.vms.iter().all(|vm| {
            matches!(
                &vm.action,
                Action::Adopt {
                    power: None,
                    remove_seed: false,
                    reseed: false,
                    ..
                }
            )
        })
    }

    /// Names of conflicting VMs.
    pub fn conflicts(&self) -> Vec<&str> {
        self.vms
            .iter()
            .filter(|vm| matches!(vm.action, Action::Conflict { .. }))
            .map(|vm| vm.name.as_str())
            .collect()
    }
}

/// A created or adopted VM.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedVm {
    pub name: String,
    pub vmid: u64,
    pub created: bool,
}

/// A destroyed (or already absent) VM.
#[derive(Debug, Clone, Serialize)]
pub struct DestroyedVm {
    pub name: String,
    /// `None` when no such VM existed.
    pub vmid: Option<u64>,
}

/// Reconciles one spec against one Proxmox host.
pub struct Provisioner {
    spec: Spec,
    spec_dir: PathBuf,
    client: Client,
    state: StateDir,
    agent_binary: PathBuf,
    allocator: VmidAllocator,
    marker: String,
    timeouts: Timeouts,
    progress: Box<dyn Fn(Progress) + Send + Sync>,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner")
            .field("marker", &self.marker)
            .finish_non_exhaustive()
    }
}

/// Builds the Proxmox client the spec describes, reading the token secret from where the
/// spec says.
pub fn client_for(spec: &Spec, spec_dir: &Path) -> Result<ClientConfig, ProvisionError> {
    let secret = match (
        &spec.proxmox.token_secret_env,
        &spec.proxmox.token_secret_file,
    ) {
        (Some(var), _) => {
            std::env::var(var).map_err(|_| ProvisionError::SecretUnset(var.clone()))?
        }
        (None, Some(file)) => {
            let path = spec_dir.join(file);
            std::fs::read_to_string(&path).map_err(|source| ProvisionError::Secret {
                source_name: path.display().to_string(),
                source,
            })?
        }
        // Invariant: `Spec::parse` requires exactly one of the two.
        (None, None) => unreachable!("validated by Spec::parse"),
    };
    let trust = if let Some(ca) = &spec.proxmox.ca_file {
        let path = spec_dir.join(ca);
        let pem = std::fs::read_to_string(&path)
            .map_err(|source| ProvisionError::CaFile { path, source })?;
        Trust::Ca(pem)
    } else if let Some(fp) = &spec.proxmox.fingerprint {
        let bytes = parse_fingerprint(fp.get_ref()).unwrap_or_default();
        let mut pin = [0u8; 32];
        pin.copy_from_slice(&bytes[..32.min(bytes.len())]);
        Trust::Fingerprint(pin)
    } else {
        Trust::Unconfigured
    };
    let mut config = ClientConfig::new(
        spec.proxmox.endpoint.get_ref().clone(),
        Auth::Token {
            id: spec.proxmox.token_id.get_ref().clone(),
            secret: Secret::new(secret.trim()),
        },
        trust,
    );
    config.task_poll = TASK_POLL;
    Ok(config)
}

impl Provisioner {
    /// A provisioner for `spec` (read from `spec_dir`), using the coordinator's `state`.
    pub fn new(
        spec: Spec,
        spec_dir: PathBuf,
        client: Client,
        state: StateDir,
        agent_binary: PathBuf,
        progress: Box<dyn Fn(Progress) + Send + Sync>,
    ) -> Result<Self, ProvisionError> {
        let ca = state.load_ca()?;
        let marker = format!("homelab-managed cluster={}", &ca.fingerprint()[..16]);
        Ok(Self {
            spec,
            spec_dir,
            client,
            state,
            agent_binary,
            allocator: VmidAllocator::default(),
            marker,
            timeouts: Timeouts::default(),
            progress,
        })
    }

    /// Overrides the step deadlines.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    fn say(&self, vm: &str, step: &'static str, message: String) {
        // The progress callback shows it to the operator; the log keeps it at debug level.
        debug!(vm, step, "{message}");
        (self.progress)(Progress {
            vm: vm.to_owned(),
            step,
            message,
        });
    }

    /// Finds the template: (vmid, node).
    async fn template(&self, resources: &[VmResource]) -> Result<(u64, String), ProvisionError> {
        let wanted = &self.spec.proxmox.template;
        let found = resources.iter().find(|r| match wanted {
            TemplateRef::Vmid(id) => r.vmid == u64::from(*id),
            TemplateRef::Name(name) => r.name.as_deref() == Some(name.as_str()) && r.template,
        });
        let found = match (found, wanted) {
            (Some(found), _) => found,
            (None, TemplateRef::Name(name)) => {
                // A non-template VM of that name gets a precise error.
                if let Some(vm) = resources.iter().find(|r| r.name.as_deref() == Some(name)) {
                    return Err(ProvisionError::NotATemplate {
                        name: name.clone(),
                        vmid: vm.vmid,
                    });
                }
                return Err(ProvisionError::NoTemplate(wanted.to_string()));
            }
            (None, TemplateRef::Vmid(_)) => {
                return Err(ProvisionError::NoTemplate(wanted.to_string()));
            }
        };
        if !found.template {
            return Err(ProvisionError::NotATemplate {
                name: found.name.clone().unwrap_or_default(),
                vmid: found.vmid,
            });
        }
        if found.node != self.spec.proxmox.node {
            return Err(ProvisionError::WrongNode {
                spec: self.spec.proxmox.node.clone(),
                actual: found.node.clone(),
            });
        }
        Ok((found.vmid, found.node.clone()))
    }

    /// Reads Proxmox and decides what apply would do. Makes no changing call.
    pub async fn plan(&self) -> Result<Plan, ProvisionError> {
        let resources = self.client.vm_resources().await?;
        let (template_vmid, template_node) = self.template(&resources).await?;
        let store = self.state.open_store()?;
        let mut vms = Vec::new();
        for vm in &self.spec.vms {
            let name = vm.name.get_ref();
            let same_name: Vec<&VmResource> = resources
                .iter()
                .filter(|r| r.name.as_deref() == Some(name.as_str()) && !r.template)
                .collect();
            let action = match same_name.as_slice() {
                [] => Action::Create,
                [existing] => {
                    let config = self.client.vm_config(&existing.node, existing.vmid).await?;
                    let description = config.text("description").unwrap_or_default();
                    if !description.contains(&self.marker) {
                        Action::Conflict {
                            vmid: existing.vmid,
                            reason: "a VM of this name exists but homelab did not create it (no marker in its description); rename or remove it".into(),
                        }
                    } else {
                        let facts_ip = store
                            .node(name)?
                            .filter(|n| n.state == NodeState::Enrolled)
                            .and_then(|n| n.facts)
                            .map(|f| f.ip_addresses);
                        let enrolled = facts_ip.is_some();
                        let drift = drift(vm, &config, facts_ip.as_deref());
                        let running = existing.status == "running";
                        let power = match (vm.vm_state, running) {
                            (VmState::Running, false) => Some(PowerChange::Start),
                            (VmState::Stopped, true) => Some(PowerChange::Stop),
                            _ => None,
                        };
                        let seed_name = seed_file(existing.vmid);
                        let seed_attached = config
                            .0
                            .values()
                            .any(|v| v.as_str().is_some_and(|s| s.contains(&seed_name)));
                        Action::Adopt {
                            vmid: existing.vmid,
                            node: existing.node.clone(),
                            status: existing.status.clone(),
                            drift,
                            power,
                            remove_seed: enrolled && seed_attached,
                            reseed: !enrolled && !seed_attached,
                        }
                    }
                }
                many => Action::Conflict {
                    vmid: many[0].vmid,
                    reason: format!("{} VMs share this name; homelab will not guess", many.len()),
                },
            };
            vms.push(PlannedVm {
                name: name.clone(),
                action,
            });
        }
        Ok(Plan {
            template_vmid,
            template_node,
            vms,
        })
    }

    /// Carries out `plan`. Creations run two at a time; everything else in spec order.
    pub async fn apply(self: &Arc<Self>, plan: &Plan) -> Result<Vec<AppliedVm>, ProvisionError> {
        let conflicts = plan.conflicts();
        if !conflicts.is_empty() {
            return Err(ProvisionError::Vm {
                name: conflicts.join(", "),
                message: "refusing to apply while VMs conflict; see the plan".into(),
            });
        }
        let agent_binary =
            Arc::new(
                std::fs::read(&self.agent_binary).map_err(|source| ProvisionError::Read {
                    path: self.agent_binary.clone(),
                    source,
                })?,
            );
        let gate = Arc::new(Semaphore::new(CLONE_CONCURRENCY));
        let mut creations = tokio::task::JoinSet::new();
        let mut applied = Vec::new();
        for planned in &plan.vms {
            match &planned.action {
                Action::Create => {
                    let this = Arc::clone(self);
                    let gate = Arc::clone(&gate);
                    let agent = Arc::clone(&agent_binary);
                    let name = planned.name.clone();
                    let template = (plan.template_vmid, plan.template_node.clone());
                    creations.spawn(async move {
                        let vmid = this.create(&name, template, &gate, &agent).await?;
                        Ok::<_, ProvisionError>(AppliedVm {
                            name,
                            vmid,
                            created: true,
                        })
                    });
                }
                Action::Adopt {
                    vmid,
                    node,
                    power,
                    remove_seed,
                    reseed,
                    drift,
                    ..
                } => {
                    for d in drift {
                        self.say(
                            &planned.name,
                            "drift",
                            format!(
                                "{}: spec says {}, VM has {} (not changed)",
                                d.field, d.spec, d.actual
                            ),
                        );
                    }
                    if *remove_seed {
                        self.remove_seed(&planned.name, node, *vmid).await?;
                    }
                    if *reseed {
                        let vm = self
                            .spec
                            .vm(&planned.name)
                            .ok_or_else(|| ProvisionError::Vm {
                                name: planned.name.clone(),
                                message: "not in the spec".into(),
                            })?;
                        self.say(
                            &planned.name,
                            "seed",
                            format!("VMID {vmid} never got its seed: seeding it now"),
                        );
                        self.seed_and_configure(vm, node, *vmid, &agent_binary)
                            .await?;
                    }
                    match power {
                        Some(PowerChange::Start) => {
                            self.power(&planned.name, node, *vmid, PowerAction::Start)
                                .await?
                        }
                        Some(PowerChange::Stop) => {
                            self.power(&planned.name, node, *vmid, PowerAction::Shutdown)
                                .await?
                        }
                        None => {}
                    }
                    applied.push(AppliedVm {
                        name: planned.name.clone(),
                        vmid: *vmid,
                        created: false,
                    });
                }
                Action::Conflict { .. } => {}
            }
        }
        while let Some(done) = creations.join_next().await {
            match done {
                Ok(result) => applied.push(result?),
                Err(join) => {
                    return Err(ProvisionError::Vm {
                        name: "apply".into(),
                        message: format!("a creation task failed: {join}"),
                    });
                }
            }
        }
        applied.sort_by_key(|a| {
            self.spec
                .vms
                .iter()
                .position(|v| v.name.get_ref() == &a.name)
        });
        Ok(applied)
    }

    async fn create(
        &self,
        name: &str,
        (template_vmid, node): (u64, String),
        gate: &Semaphore,
        agent_binary: &[u8],
    ) -> Result<u64, ProvisionError> {
        let vm = self.spec.vm(name).ok_or_else(|| ProvisionError::Vm {
            name: name.to_owned(),
            message: "not in the spec".into(),
        })?;
        let node = node.as_str();
        // 1-2. A VMID, and the clone. A nextid race shows as "already exists": take another.
        let vmid = {
            let _permit = gate.acquire().await.map_err(|_| ProvisionError::Vm {
                name: name.to_owned(),
                message: "clone gate closed".into(),
            })?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                let vmid = self.allocator.allocate(&self.client).await?;
                self.say(
                    name,
                    "clone",
                    format!("cloning template {template_vmid} to VMID {vmid}"),
                );
                let request = CloneRequest {
                    node,
                    template_vmid,
                    new_vmid: vmid,
                    name,
                    full: self.spec.proxmox.clone == CloneMode::Full,
                    storage: self.spec.proxmox.vm_storage.as_deref(),
                    description: &self.marker,
                };
                let started = self.client.clone_vm(&request).await;
                match started {
                    Ok(task) => {
                        let waited = self.client.wait_task(&task, self.timeouts.clone).await;
                        self.allocator.release(vmid).await;
                        waited?;
                        break vmid;
                    }
                    Err(e)
                        if e.kind() == Some(crate::proxmox::ApiErrorKind::AlreadyExists)
                            && attempt < 5 =>
                    {
                        self.allocator.release(vmid).await;
                        self.say(
                            name,
                            "clone",
                            format!("VMID {vmid} was taken meanwhile; picking another"),
                        );
                    }
                    Err(e) => {
                        self.allocator.release(vmid).await;
                        return Err(e.into());
                    }
                }
            }
        };
        self.seed_and_configure(vm, node, vmid, agent_binary)
            .await?;
        if vm.vm_state == VmState::Running {
            self.power(name, node, vmid, PowerAction::Start).await?;
        }
        self.say(
            name,
            "created",
            format!("VMID {vmid} ready; its agent will enroll and call home"),
        );
        Ok(vmid)
    }

    /// Steps 3–6 of a creation: wait for the clone's lock, seed, configure, grow the disk,
    /// enable the firewall. Also what re-seeds a VM an interrupted apply left without a seed.
    async fn seed_and_configure(
        &self,
        vm: &VmSpec,
        node: &str,
        vmid: u64,
        agent_binary: &[u8],
    ) -> Result<(), ProvisionError> {
        let name = vm.name.get_ref().as_str();
        // 3. The clone's lock must clear before anything touches the VM.
        self.client
            .wait_unlocked(node, vmid, self.timeouts.unlock)
            .await?;
        let config = self.client.vm_config(node, vmid).await?;
        let mac = config.net0_mac().ok_or_else(|| ProvisionError::Vm {
            name: name.to_owned(),
            message: "the clone has no net0 with a MAC address; give the template a network device"
                .into(),
        })?;

        // 4. The seed: a fresh one-time token, rendered, packed with the agent, uploaded.
        self.say(name, "seed", "building the NoCloud seed".into());
        let iso = self.seed_iso(vm, vmid, InterfaceMatch::Mac(mac.clone()), agent_binary)?;
        let file = seed_file(vmid);
        let storage = &self.spec.proxmox.iso_storage;
        self.say(
            name,
            "upload",
            format!("uploading {file} ({} KiB) to {storage}", iso.len() / 1024),
        );
        let upload = self.client.upload_iso(node, storage, &file, iso).await?;
        self.client.wait_task(&upload, self.timeouts.upload).await?;

        // 5. Configure everything before the first start.
        self.say(
            name,
            "configure",
            format!(
                "{} cores, {} MiB, seed attached, firewall on",
                vm.cores.get_ref(),
                vm.memory.get_ref()
            ),
        );
        let mut params: Vec<(&str, String)> = vec![
            ("cores", vm.cores.get_ref().to_string()),
            ("memory", vm.memory.get_ref().to_string()),
            ("agent", "1".into()),
            (
                "net0",
                format!(
                    "virtio={},bridge={},firewall=1",
                    mac.to_ascii_uppercase(),
                    self.spec.network.bridge
                ),
            ),
            ("ide3", format!("{storage}:iso/{file},media=cdrom")),
        ];
        // Proxmox's own cloud-init drive would be a second `cidata` source: remove it.
        let cloudinit: Vec<String> = config
            .0
            .iter()
            .filter(|(k, v)| {
                k.as_str() != "ide3" && v.as_str().is_some_and(|s| s.contains("cloudinit"))
            })
            .map(|(k, _)| k.clone())
            .collect();
        if !cloudinit.is_empty() {
            params.push(("delete", cloudinit.join(",")));
        }
        if let Some(digest) = config.digest() {
            params.push(("digest", digest));
        }
        self.client.set_vm_config(node, vmid, &params).await?;
        if let Some(disk) = &vm.disk {
            let wanted = parse_size_gib(disk.get_ref()).unwrap_or(0);
            let current = config
                .text("scsi0")
                .and_then(|s| disk_size_gib(&s))
                .unwrap_or(0);
            if wanted > current {
                self.say(name, "resize", format!("growing scsi0 to {wanted}G"));
                if let Some(task) = self
                    .client
                    .resize(node, vmid, "scsi0", &format!("{wanted}G"))
                    .await?
                {
                    self.client.wait_task(&task, self.timeouts.power).await?;
                }
            }
        }
        self.client.enable_firewall(node, vmid).await?;
        Ok(())
    }

    /// Renders the seed ISO for `vm`, creating its one-time token.
    fn seed_iso(
        &self,
        vm: &VmSpec,
        vmid: u64,
        interface: InterfaceMatch,
        agent_binary: &[u8],
    ) -> Result<Vec<u8>, ProvisionError> {
        let seed = self.render_seed(
            vm,
            &format!("iid-{vmid}-{}", hex::encode(rand::random::<[u8; 4]>())),
            interface,
        )?;
        seed.iso(agent_binary)
            .map_err(|source| ProvisionError::Seed {
                node: vm.name.get_ref().clone(),
                source,
            })
    }

    /// Renders `vm`'s seed with a new one-time token.
    pub fn render_seed(
        &self,
        vm: &VmSpec,
        instance_id: &str,
        interface: InterfaceMatch,
    ) -> Result<Seed, ProvisionError> {
        let node: NodeName = vm.node_name();
        let ca_pem = self.state.read(&self.state.ca_cert())?;
        let key_path = expand_home(&self.spec.access.ssh_public_key, &self.spec_dir);
        let ssh_key =
            std::fs::read_to_string(&key_path).map_err(|source| ProvisionError::Read {
                path: key_path.clone(),
                source,
            })?;
        let token = EnrollmentToken::generate();
        {
            let mut store = self.state.open_store()?;
            let now = now_unix();
            let ttl = i64::try_from(SEED_TOKEN_TTL.as_secs()).unwrap_or(i64::MAX / 2);
            store.insert_token(&token.hash(), node.as_str(), now, now + ttl)?;
            store.append_event(
                node.as_str(),
                "token.created",
                "enrollment token created for the node's seed",
                now_unix_ms(),
            )?;
        }
        let net = self.spec.net();
        let search = self.spec.network.search_domain.as_deref();
        Seed::render(&SeedInput {
            node: &node,
            instance_id,
            user: &self.spec.access.user,
            ssh_public_key: ssh_key.trim(),
            locale: &self.spec.access.locale,
            coordinator_url: self.spec.coordinator.url.get_ref(),
            ca_pem: &ca_pem,
            token: token.expose(),
            interface,
            address: *vm.ip.get_ref(),
            prefix: net.prefix,
            gateway: *self.spec.network.gateway.get_ref(),
            dns: &self.spec.network.dns,
            search_domain: search,
        })
        .map_err(|source| ProvisionError::Seed {
            node: node.to_string(),
            source,
        })
    }

    async fn power(
        &self,
        name: &str,
        node: &str,
        vmid: u64,
        action: PowerAction,
    ) -> Result<(), ProvisionError> {
        let verb = match action {
            PowerAction::Start => "starting",
            PowerAction::Shutdown => "shutting down",
            PowerAction::Stop => "stopping",
        };
        self.say(name, "power", format!("{verb} VMID {vmid}"));
        let task = self.client.power(node, vmid, action).await?;
        match self.client.wait_task(&task, self.timeouts.power).await {
            Ok(_) => Ok(()),
            // "Already running" is a task failure in Proxmox, and exactly what was wanted.
            Err(ProxmoxError::TaskFailed { exitstatus, .. })
                if action == PowerAction::Start && exitstatus.contains("already running") =>
            {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn remove_seed(&self, name: &str, node: &str, vmid: u64) -> Result<(), ProvisionError> {
        let file = seed_file(vmid);
        let config = self.client.vm_config(node, vmid).await?;
        let slots: Vec<String> = config
            .0
            .iter()
            .filter(|(_, v)| v.as_str().is_some_and(|s| s.contains(&file)))
            .map(|(k, _)| k.clone())
            .collect();
        self.say(
            name,
            "seed",
            format!("node enrolled: ejecting and deleting {file}"),
        );
        for slot in &slots {
            // Ejecting the medium applies to a running VM at once.
            self.client
                .set_vm_config(node, vmid, &[(slot.as_str(), "none,media=cdrom".into())])
                .await?;
        }
        let volid = format!("{}:iso/{file}", self.spec.proxmox.iso_storage);
        if let Some(task) = self
            .client
            .delete_volume(node, &self.spec.proxmox.iso_storage, &volid)
            .await?
        {
            self.client.wait_task(&task, self.timeouts.delete).await?;
        }
        Ok(())
    }

    /// Destroys the named VMs (all of the spec's when `names` is empty). Idempotent.
    pub async fn destroy(&self, names: &[String]) -> Result<Vec<DestroyedVm>, ProvisionError> {
        let wanted: Vec<String> = if names.is_empty() {
            self.spec
                .vms
                .iter()
                .map(|v| v.name.get_ref().clone())
                .collect()
        } else {
            names.to_vec()
        };
        let resources = self.client.vm_resources().await?;
        let mut out = Vec::new();
        for name in wanted {
            let found: Vec<&VmResource> = resources
                .iter()
                .filter(|r| r.name.as_deref() == Some(name.as_str()) && !r.template)
                .collect();
            let mut ours = Vec::new();
            for r in found {
                let config = match self.client.vm_config(&r.node, r.vmid).await {
                    Ok(config) => config,
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => return Err(e.into()),
                };
                if config
                    .text("description")
                    .unwrap_or_default()
                    .contains(&self.marker)
                {
                    ours.push(r);
                } else {
                    self.say(
                        &name,
                        "skip",
                        format!(
                            "VMID {} has this name but is not homelab's; left alone",
                            r.vmid
                        ),
                    );
                }
            }
            if ours.is_empty() {
                self.say(&name, "absent", "no such VM: nothing to destroy".into());
                out.push(DestroyedVm { name, vmid: None });
                continue;
            }
            for r in ours {
                let status = self.client.vm_status(&r.node, r.vmid).await;
                match status {
                    Ok(s) if s.status == "running" => {
                        self.power(&name, &r.node, r.vmid, PowerAction::Stop)
                            .await?;
                    }
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
                self.say(&name, "delete", format!("deleting VMID {}", r.vmid));
                if let Some(task) = self.client.delete_vm(&r.node, r.vmid).await? {
                    self.client.wait_task(&task, self.timeouts.delete).await?;
                }
                let file = seed_file(r.vmid);
                let storage = &self.spec.proxmox.iso_storage;
                let volumes = self
                    .client
                    .storage_content(&r.node, storage, Some("iso"))
                    .await?;
                if let Some(volume) = volumes
                    .iter()
                    .find(|v| v.volid.ends_with(&format!("iso/{file}")))
                {
                    self.say(&name, "seed", format!("deleting {}", volume.volid));
                    if let Some(task) = self
                        .client
                        .delete_volume(&r.node, storage, &volume.volid)
                        .await?
                    {
                        self.client.wait_task(&task, self.timeouts.delete).await?;
                    }
                }
                out.push(DestroyedVm {
                    name: name.clone(),
                    vmid: Some(r.vmid),
                });
            }
        }
        Ok(out)
    }
}

/// The seed image's file name on the ISO storage.
pub fn seed_file(vmid: u64) -> String {
    format!("seed-{vmid}.iso")
}

fn drift(vm: &VmSpec, config: &VmConfig, ips: Option<&[String]>) -> Vec<Drift> {
    let mut out = Vec::new();
    let cores = config.number("cores").unwrap_or(1);
    if cores != u64::from(*vm.cores.get_ref()) {
        out.push(Drift {
            field: "cores",
            spec: vm.cores.get_ref().to_string(),
            actual: cores.to_string(),
        });
    }
    if let Some(memory) = config.number("memory")
        && memory != u64::from(*vm.memory.get_ref())
    {
        out.push(Drift {
            field: "memory",
            spec: format!("{} MiB", vm.memory.get_ref()),
            actual: format!("{memory} MiB"),
        });
    }
    if let Some(ips) = ips {
        let wanted: Ipv4Addr = *vm.ip.get_ref();
        if !ips.iter().any(|ip| ip == &wanted.to_string()) {
            out.push(Drift {
                field: "ip",
                spec: wanted.to_string(),
                actual: if ips.is_empty() {
                    "none reported".into()
                } else {
                    ips.join(", ")
                },
            });
        }
    }
    out
}

/// `size=3584M` or `size=32G` in a disk property string, in whole GiB (rounded down).
fn disk_size_gib(disk: &str) -> Option<u64> {
    let size = disk.split(',').find_map(|p| p.strip_prefix("size="))?;
    let (number, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    match unit {
        "K" => Some(n / (1024 * 1024)),
        "M" => Some(n / 1024),
        "G" => Some(n),
        "T" => Some(n * 1024),
        _ => None,
    }
}

fn expand_home(path: &Path, base: &Path) -> PathBuf {
    if let Ok(rest) = path.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    base.join(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_sizes_read_from_property_strings() {
        assert_eq!(
            disk_size_gib("local-lvm:vm-1-disk-0,iothread=1,size=3584M"),
            Some(3)
        );
        assert_eq!(disk_size_gib("local-lvm:vm-1-disk-0,size=32G"), Some(32));
        assert_eq!(disk_size_gib("local-lvm:vm-1-disk-0"), None);
    }

    #[test]
    fn home_is_expanded_and_relative_paths_follow_the_spec() {
        let base = Path::new("/etc/homelab");
        assert_eq!(
            expand_home(Path::new("key.pub"), base),
            PathBuf::from("/etc/homelab/key.pub")
        );
        assert!(!expand_home(Path::new("~/.ssh/id_ed25519.pub"), base).starts_with("~"));
    }
}
