//! `/nodes/{node}/qemu/…`: list, clone, config, resize, power, status, delete, firewall
//! options, guest agent and cloud-init.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use percent_encoding::percent_decode_str;
use rand::Rng as _;
use serde_json::{Map, Value, json};

use super::cluster::{may_audit, vm_summary};
use super::{ApiError, Ctx, Endpoint, Reply, check_lock, num, vmid};
use crate::config::TaskType;
use crate::propstr::{self, PropMap};
use crate::schema::{
    self, BOOL, Fmt, NODE, Param, Params, STORAGE, STR, Schema, Ty, UINT, fmt, max_len, range,
};
use crate::state::{
    Effect, Power, State, TaskEnd, TaskSpec, Vm, Volume, agent_enabled, drive_file, drive_size,
    epoch_now, is_cdrom, is_cloudinit, is_disk_key,
};

pub(super) fn route(method: &str, rest: &[&str]) -> Option<&'static Endpoint> {
    Some(match (method, rest) {
        ("GET", []) => &VM_INDEX,
        ("DELETE", []) => &DESTROY,
        ("POST", ["clone"]) => &CLONE,
        ("GET", ["config"]) => &CONFIG_GET,
        ("PUT", ["config"]) => &CONFIG_PUT,
        ("POST", ["config"]) => &CONFIG_POST,
        ("PUT", ["resize"]) => &RESIZE,
        ("GET", ["status", "current"]) => &STATUS_CURRENT,
        ("POST", ["status", "start"]) => &START,
        ("POST", ["status", "stop"]) => &STOP,
        ("POST", ["status", "shutdown"]) => &SHUTDOWN,
        ("GET", ["firewall", "options"]) => &FIREWALL_GET,
        ("PUT", ["firewall", "options"]) => &FIREWALL_PUT,
        ("GET", ["agent", "network-get-interfaces"]) => &AGENT_NETWORK,
        ("GET", ["cloudinit"]) => &CLOUDINIT_GET,
        ("PUT", ["cloudinit"]) => &CLOUDINIT_PUT,
        _ => return None,
    })
}

const VMID: Param = Param::req("vmid", Ty::VmId);
const NODE_PARAM: Param = Param::req("node", NODE);
const DISKS: &[&str] = &[
    "ide0",
    "ide1",
    "ide2",
    "ide3",
    "scsi0",
    "scsi1",
    "scsi2",
    "scsi3",
    "scsi4",
    "scsi5",
    "scsi6",
    "scsi7",
    "scsi8",
    "scsi9",
    "scsi10",
    "scsi11",
    "scsi12",
    "scsi13",
    "scsi14",
    "scsi15",
    "scsi16",
    "scsi17",
    "scsi18",
    "scsi19",
    "scsi20",
    "scsi21",
    "scsi22",
    "scsi23",
    "scsi24",
    "scsi25",
    "scsi26",
    "scsi27",
    "scsi28",
    "scsi29",
    "scsi30",
    "virtio0",
    "virtio1",
    "virtio2",
    "virtio3",
    "virtio4",
    "virtio5",
    "virtio6",
    "virtio7",
    "virtio8",
    "virtio9",
    "virtio10",
    "virtio11",
    "virtio12",
    "virtio13",
    "virtio14",
    "virtio15",
    "sata0",
    "sata1",
    "sata2",
    "sata3",
    "sata4",
    "sata5",
    "efidisk0",
    "tpmstate0",
];
const MASKED_PASSWORD: &str = "**********";

// ---------------------------------------------------------------------------------------
// Config keys

const DRIVE: Ty = fmt(Fmt::Prop(&propstr::DRIVE));

/// The VM config keys the update calls accept, with their types.
static CONFIG_KEYS: &[Param] = &[
    Param::opt("acpi", BOOL),
    Param::opt("affinity", STR),
    Param::opt("agent", fmt(Fmt::Prop(&propstr::AGENT))),
    Param::opt("allow-ksm", BOOL),
    Param::opt("amd-sev", STR),
    Param::opt("arch", Ty::Enum(&["x86_64", "aarch64"])),
    Param::opt("args", STR),
    Param::opt("audio0", STR),
    Param::opt("autostart", BOOL),
    Param::opt("balloon", UINT),
    Param::opt("bios", Ty::Enum(&["seabios", "ovmf"])),
    Param::opt("boot", fmt(Fmt::Prop(&propstr::BOOT))),
    Param::opt("bootdisk", Ty::Pattern(is_disk_key)),
    Param::opt("cdrom", STR),
    Param::opt("cicustom", STR),
    Param::opt("cipassword", STR),
    Param::opt(
        "citype",
        Ty::Enum(&["configdrive2", "nocloud", "opennebula"]),
    ),
    Param::opt("ciupgrade", BOOL),
    Param::opt("ciuser", STR),
    Param::opt(
        "cores",
        Ty::Int {
            min: Some(1),
            max: None,
        },
    ),
    Param::opt("cpu", STR),
    Param::opt(
        "cpulimit",
        Ty::Num {
            min: Some(0.0),
            max: Some(128.0),
        },
    ),
    Param::opt("cpuunits", range(1, 262_144)),
    Param::opt("description", max_len(8192)),
    Param::opt("efidisk0", DRIVE),
    Param::opt("freeze", BOOL),
    Param::opt("hookscript", STR),
    Param::opt("hotplug", STR),
    Param::opt("hugepages", Ty::Enum(&["any", "2", "1024"])),
    Param::opt("intel-tdx", STR),
    Param::opt("ivshmem", STR),
    Param::opt("keephugepages", BOOL),
    Param::opt(
        "keyboard",
        Ty::Enum(&[
            "de", "de-ch", "da", "en-gb", "en-us", "es", "fi", "fr", "fr-be", "fr-ca", "fr-ch",
            "hu", "is", "it", "ja", "lt", "mk", "nl", "no", "pl", "pt", "pt-br", "sv", "sl", "tr",
        ]),
    ),
    Param::opt("kvm", BOOL),
    Param::opt("localtime", BOOL),
    Param::opt(
        "lock",
        Ty::Enum(&[
            "backup",
            "clone",
            "create",
            "migrate",
            "rollback",
            "snapshot",
            "snapshot-delete",
            "suspending",
            "suspended",
        ]),
    ),
    Param::opt("machine", STR),
    Param::opt("memory", fmt(Fmt::Prop(&propstr::MEMORY))),
    Param::opt(
        "migrate_downtime",
        Ty::Num {
            min: Some(0.0),
            max: None,
        },
    ),
    Param::opt("migrate_speed", UINT),
    Param::opt("name", fmt(Fmt::DnsName)),
    Param::opt("nameserver", fmt(Fmt::AddressList)),
    Param::opt("numa", BOOL),
    Param::opt("onboot", BOOL),
    Param::opt(
        "ostype",
        Ty::Enum(&[
            "other", "wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11",
            "l24", "l26", "solaris",
        ]),
    ),
    Param::opt("protection", BOOL),
    Param::opt("reboot", BOOL),
    Param::opt("rng0", STR),
    Param::opt(
        "scsihw",
        Ty::Enum(&[
            "lsi",
            "lsi53c810",
            "virtio-scsi-pci",
            "virtio-scsi-single",
            "megasas",
            "pvscsi",
        ]),
    ),
    Param::opt("searchdomain", STR),
    Param::opt("shares", range(0, 50_000)),
    Param::opt("smbios1", max_len(512)),
    Param::opt(
        "smp",
        Ty::Int {
            min: Some(1),
            max: None,
        },
    ),
    Param::opt(
        "sockets",
        Ty::Int {
            min: Some(1),
            max: None,
        },
    ),
    Param::opt("spice_enhancements", STR),
    Param::opt("sshkeys", fmt(Fmt::UrlEncoded)),
    Param::opt("startdate", STR),
    Param::opt("startup", STR),
    Param::opt("tablet", BOOL),
    Param::opt("tags", fmt(Fmt::TagList)),
    Param::opt("tdf", BOOL),
    Param::opt("template", BOOL),
    Param::opt("tpmstate0", DRIVE),
    Param::opt(
        "vcpus",
        Ty::Int {
            min: Some(1),
            max: None,
        },
    ),
    Param::opt("vga", STR),
    Param::opt("vmgenid", STR),
    Param::opt("vmstatestorage", STORAGE),
    Param::opt("watchdog", STR),
];

/// A numbered key `<prefix><n>` with `n <= max`.
fn numbered(name: &str, prefix: &str, max: u32) -> bool {
    name.strip_prefix(prefix)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n <= max)
}

/// The schema entry of a config key.
fn config_param(name: &str) -> Option<Param> {
    if let Some(param) = CONFIG_KEYS.iter().find(|p| p.name == name) {
        return Some(*param);
    }
    let ty = if is_disk_key(name) || numbered(name, "unused", 255) {
        DRIVE
    } else if numbered(name, "net", 31) {
        fmt(Fmt::Prop(&propstr::NET))
    } else if numbered(name, "ipconfig", 31) {
        fmt(Fmt::Prop(&propstr::IPCONFIG))
    } else if numbered(name, "serial", 3)
        || numbered(name, "parallel", 2)
        || numbered(name, "usb", 4)
        || numbered(name, "hostpci", 15)
        || numbered(name, "numa", 7)
        || numbered(name, "virtiofs", 9)
    {
        STR
    } else {
        return None;
    };
    Some(Param::opt(
        // The schema only needs the name for messages; the key itself is the map key.
        "property", ty,
    ))
}

/// Parameters of the config update calls that are not config keys.
const UPDATE_CONTROL: &[&str] = &[
    "node",
    "vmid",
    "delete",
    "revert",
    "digest",
    "skiplock",
    "force",
    "background_delay",
    "import-working-storage",
];

/// Config keys whose change applies to a running VM at once.
const FAST_PLUG: &[&str] = &[
    "name",
    "description",
    "onboot",
    "tags",
    "protection",
    "startup",
    "shares",
    "hookscript",
];

fn is_cloudinit_key(key: &str) -> bool {
    matches!(
        key,
        "ciuser"
            | "cipassword"
            | "sshkeys"
            | "nameserver"
            | "searchdomain"
            | "citype"
            | "ciupgrade"
            | "cicustom"
    ) || numbered(key, "ipconfig", 31)
}

/// Renders a stored config value the way `GET …/config` types it.
fn json_value(key: &str, value: &str) -> Value {
    if key == "cipassword" {
        return json!(MASKED_PASSWORD);
    }
    match config_param(key).map(|p| p.ty) {
        Some(Ty::Bool | Ty::Int { .. } | Ty::VmId) => value
            .parse::<i64>()
            .map_or_else(|_| json!(value), Value::from),
        Some(Ty::Num { .. }) => value
            .parse::<f64>()
            .map_or_else(|_| json!(value), Value::from),
        _ => json!(value),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

/// A fresh MAC in the Proxmox OUI `BC:24:11`.
fn random_mac() -> String {
    let mut rng = rand::rng();
    format!(
        "BC:24:11:{:02X}:{:02X}:{:02X}",
        rng.random::<u8>(),
        rng.random::<u8>(),
        rng.random::<u8>()
    )
}

fn random_uuid() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `sid:name` of a drive file, if it names a storage volume.
fn split_volid(file: &str) -> Option<(&str, &str)> {
    file.split_once(':')
        .filter(|(sid, _)| !sid.is_empty() && !sid.starts_with('/'))
}

/// The id under which a storage lists a drive's volume (linked clones name their base first).
fn listing_volid(file: &str) -> Option<String> {
    let (sid, name) = split_volid(file)?;
    let last = name.rsplit('/').next().unwrap_or(name);
    if name.starts_with("iso/") || name.starts_with("vztmpl/") || name.starts_with("import/") {
        Some(file.to_owned())
    } else {
        Some(format!("{sid}:{last}"))
    }
}

fn new_disk_name(state: &State, vmid: u32) -> String {
    (0..)
        .map(|i| format!("vm-{vmid}-disk-{i}"))
        .find(|name| {
            !state
                .storages
                .values()
                .any(|s| s.volumes.keys().any(|v| v.ends_with(&format!(":{name}"))))
        })
        .unwrap_or_default()
}

/// A running worker that holds the VM's config lock makes writers time out on it, as the
/// `flock` on `/var/lock/qemu-server/lock-<vmid>.conf` does.
fn check_config_lock(state: &State, vmid: u32) -> Result<(), ApiError> {
    let holder = state.tasks.iter().any(|t| {
        !t.finished
            && t.id == vmid.to_string()
            && matches!(
                t.kind,
                TaskType::Start
                    | TaskType::Stop
                    | TaskType::Shutdown
                    | TaskType::Config
                    | TaskType::Resize
            )
    });
    if holder {
        Err(ApiError::die(format!(
            "can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout"
        )))
    } else {
        Ok(())
    }
}

fn one_line_log(line: String) -> Vec<String> {
    vec![line]
}

/// `PVE::Tools::validate_ssh_public_keys`: each non-comment line must parse as a key.
fn valid_ssh_keys(text: &str) -> bool {
    const TYPES: &[&str] = &[
        "ssh-rsa",
        "ssh-dss",
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .all(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(pos) = fields.iter().position(|f| TYPES.contains(f)) else {
                return false;
            };
            let Some(blob) = fields.get(pos + 1).and_then(|b| BASE64.decode(b).ok()) else {
                return false;
            };
            let kind = fields[pos].as_bytes();
            blob.len() >= 4 + kind.len()
                && u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize == kind.len()
                && &blob[4..4 + kind.len()] == kind
        })
}

fn hash_password(plain: &str) -> String {
    let crypt_like = plain.starts_with('$')
        && ["$1$", "$5$", "$6$", "$2a$", "$2y$"]
            .iter()
            .any(|p| plain.starts_with(p))
        && plain.matches('$').count() >= 3;
    if crypt_like {
        plain.to_owned()
    } else {
        format!(
            "$5$pvesim${}",
            crate::state::short_digest(&[b"cipassword", plain.as_bytes()])
        )
    }
}

// ---------------------------------------------------------------------------------------
// List and index

pub(super) static LIST: Endpoint = Endpoint {
    schema: Schema::fixed(&[NODE_PARAM, Param::opt("full", BOOL)]),
    handler: list,
};

fn list(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?;
    let list: Vec<Value> = ctx
        .state
        .vms
        .values()
        .filter(|vm| vm.node == node && may_audit(ctx, vm))
        .map(|vm| {
            let mut entry = vm_summary(ctx, vm);
            entry.insert("cpus".into(), num(vm.cpus()));
            if let Power::Running { pid, .. } = vm.power {
                entry.insert("pid".into(), json!(pid));
                entry.insert("qmpstatus".into(), json!("running"));
            } else {
                entry.insert("qmpstatus".into(), json!("stopped"));
            }
            Value::Object(entry)
        })
        .collect();
    Ok(Reply::Data(Value::Array(list)))
}

static VM_INDEX: Endpoint = Endpoint {
    schema: Schema::fixed(&[NODE_PARAM, VMID]),
    handler: vm_index,
};

fn vm_index(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?;
    ctx.vm(node, vmid(params, "vmid"))?;
    let subdirs = [
        "config",
        "pending",
        "status",
        "firewall",
        "agent",
        "cloudinit",
        "clone",
        "resize",
    ];
    Ok(Reply::Data(Value::Array(
        subdirs.iter().map(|s| json!({ "subdir": s })).collect(),
    )))
}

// ---------------------------------------------------------------------------------------
// Clone

static CLONE: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        NODE_PARAM,
        VMID,
        Param::req("newid", Ty::VmId),
        Param::opt("name", fmt(Fmt::DnsName)),
        Param::opt("description", STR),
        Param::opt("full", BOOL),
        Param::opt("target", NODE),
        Param::opt("storage", STORAGE),
        Param::opt("format", Ty::Enum(&["raw", "qcow2", "vmdk"])),
        Param::opt("pool", fmt(Fmt::PoolId)),
        Param::opt("snapname", max_len(40)),
        Param::opt("bwlimit", UINT),
    ]),
    handler: clone,
};

fn clone(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?.to_owned();
    let vmid = vmid(params, "vmid");
    let newid = super::vmid(params, "newid");
    let src = ctx
        .state
        .vms
        .get(&vmid)
        .filter(|vm| vm.node == node)
        .cloned()
        .ok_or_else(|| {
            ApiError::die(format!(
                "unable to find configuration file for VM {vmid} on node '{node}'"
            ))
        })?;
    ctx.check(&format!("/vms/{vmid}"), &["VM.Clone"])?;
    let pool = params.str("pool").map(str::to_owned);
    let allocate_ok = ctx.has(&format!("/vms/{newid}"), &["VM.Allocate"])
        || pool
            .as_ref()
            .is_some_and(|p| ctx.has(&format!("/pool/{p}"), &["VM.Allocate"]));
    if !allocate_ok {
        return Err(ApiError::forbidden(
            &format!("/vms/{newid}"),
            &["VM.Allocate"],
        ));
    }
    if let Some(pool) = &pool
        && !ctx.state.pools.contains(pool)
    {
        return Err(ApiError::status(
            403,
            format!("pool '{pool}' does not exist"),
        ));
    }
    check_lock(&src)?;
    if ctx.state.vms.contains_key(&newid) {
        return Err(ApiError::die(format!(
            "unable to create VM {newid}: config file already exists"
        )));
    }
    let full = params.flag("full").unwrap_or(false) || !src.is_template();
    let storage_param = params.str("storage").map(str::to_owned);
    if !full {
        if storage_param.is_some() {
            return Err(ApiError::die(
                "parameter 'storage' not allowed for linked clones",
            ));
        }
        if params.str("format").is_some() {
            return Err(ApiError::die(
                "parameter 'format' not allowed for linked clones",
            ));
        }
    }
    if let Some(sid) = &storage_param {
        let storage = ctx
            .state
            .storages
            .get(sid)
            .ok_or_else(|| ApiError::die(format!("storage '{sid}' does not exist")))?;
        if !storage.spec.supports("images") {
            return Err(ApiError::status(
                400,
                format!("storage '{sid}' does not support vm images"),
            ));
        }
    }
    let target = params.str("target").unwrap_or(&node).to_owned();
    if target != node {
        if !ctx.state.nodes.contains(&target) {
            return Err(ApiError::die(format!("no such cluster node '{target}'")));
        }
        let local = src.config.iter().any(|(key, value)| {
            is_disk_key(key)
                && drive_file(value)
                    .as_deref()
                    .and_then(split_volid)
                    .is_some_and(|(sid, _)| {
                        ctx.state.storages.get(sid).is_none_or(|s| !s.spec.shared)
                    })
        });
        if local {
            return Err(ApiError::die(format!(
                "can't clone VM to node '{target}' (VM uses local storage)"
            )));
        }
        if let Some(sid) = &storage_param
            && ctx.state.storages.get(sid).is_some_and(|s| !s.spec.shared)
        {
            return Err(ApiError::die(format!(
                "can't clone to non-shared storage '{sid}'"
            )));
        }
    }

    // Plan the disks.
    let mut config = BTreeMap::new();
    let mut volumes = Vec::new();
    let mut log = Vec::new();
    let mut slot_storage = None;
    let mut disk_index = 0;
    let ctime = epoch_now();
    for (key, value) in &src.config {
        if matches!(key.as_str(), "template" | "lock" | "parent") || key.starts_with("unused") {
            continue;
        }
        let value = if numbered(key, "net", 31) {
            match propstr::parse(&propstr::NET, key, value) {
                Ok(mut net) => {
                    propstr::set(&mut net, "macaddr", &random_mac());
                    propstr::render(&propstr::NET, &net)
                }
                Err(_) => value.clone(),
            }
        } else if key == "smbios1" {
            let mut parts: Vec<String> = value
                .split(',')
                .filter(|p| !p.starts_with("uuid="))
                .map(str::to_owned)
                .collect();
            parts.insert(0, format!("uuid={}", random_uuid()));
            parts.join(",")
        } else if key == "vmgenid" {
            random_uuid()
        } else if is_disk_key(key) && (!is_cdrom(value) || is_cloudinit(value)) {
            let Some(file) = drive_file(value) else {
                config.insert(key.clone(), value.clone());
                continue;
            };
            let Some((sid, name)) = split_volid(&file) else {
                config.insert(key.clone(), value.clone());
                continue;
            };
            let storage = ctx
                .state
                .storages
                .get(sid)
                .ok_or_else(|| ApiError::die(format!("storage '{sid}' does not exist")))?;
            let target_sid = if full {
                storage_param.clone().unwrap_or_else(|| sid.to_owned())
            } else {
                sid.to_owned()
            };
            let mut drive = propstr::parse(&propstr::DRIVE, key, value).unwrap_or_default();
            if is_cloudinit(value) {
                let new = format!("{target_sid}:vm-{newid}-cloudinit");
                propstr::set(&mut drive, "file", &new);
                volumes.push((
                    target_sid.clone(),
                    Volume {
                        volid: new,
                        content: "images".into(),
                        format: "raw".into(),
                        size: 4 << 20,
                        ctime,
                        vmid: Some(newid),
                        data: None,
                    },
                ));
                config.insert(key.clone(), propstr::render(&propstr::DRIVE, &drive));
                continue;
            }
            if !full && !storage.spec.kind.linked_clones() {
                return Err(ApiError::die(format!(
                    "Linked clone feature is not supported for '{file}' ({key})"
                )));
            }
            let disk = format!("vm-{newid}-disk-{disk_index}");
            disk_index += 1;
            let new_file = if full {
                format!("{target_sid}:{disk}")
            } else {
                format!("{sid}:{name}/{disk}")
            };
            log.push(format!(
                "create {} clone of drive {key} ({file})",
                if full { "full" } else { "linked" }
            ));
            log.push(format!("  Logical volume \"{disk}\" created."));
            let size = drive_size(value).unwrap_or(0);
            if full {
                log.push(format!("transferred 0.0 B of {} (0.00%)", human_size(size)));
                log.push(format!(
                    "transferred {0} of {0} (100.00%)",
                    human_size(size)
                ));
            }
            volumes.push((
                target_sid.clone(),
                Volume {
                    volid: format!("{target_sid}:{disk}"),
                    content: "images".into(),
                    format: "raw".into(),
                    size,
                    ctime,
                    vmid: Some(newid),
                    data: None,
                },
            ));
            slot_storage.get_or_insert(target_sid);
            propstr::set(&mut drive, "file", &new_file);
            propstr::render(&propstr::DRIVE, &drive)
        } else {
            value.clone()
        };
        config.insert(key.clone(), value);
    }
    let name = params.str("name").map(str::to_owned).unwrap_or_else(|| {
        format!(
            "Copy-of-VM-{}",
            src.name().map_or_else(|| vmid.to_string(), str::to_owned)
        )
    });
    config.insert("name".into(), name);
    if let Some(description) = params.str("description") {
        config.insert("description".into(), description.to_owned());
    }
    for (sid, _) in &volumes {
        ctx.check(&format!("/storage/{sid}"), &["Datastore.AllocateSpace"])?;
    }

    // Storage allocation slot, or the storage lock timeout.
    let timing = ctx.state.knobs.timing.clone();
    let duration = if full {
        timing.full_clone
    } else {
        timing.clone
    };
    let (end, effect, duration, slot) = match &slot_storage {
        Some(sid) => match ctx.state.clone_slot(sid, ctx.now, duration) {
            Ok(start) => (
                TaskEnd::Ok,
                Effect::FinishClone {
                    newid,
                    node: target.clone(),
                    config,
                    volumes,
                },
                duration,
                Some((sid.clone(), start)),
            ),
            Err(()) => {
                let shared = ctx.state.storages.get(sid).is_some_and(|s| s.spec.shared);
                let reason = if shared {
                    format!("cfs-lock 'storage-{sid}' error: got lock request timeout")
                } else {
                    format!(
                        "can't lock file '/var/lock/pve-manager/pve-storage-{sid}' - got timeout"
                    )
                };
                (
                    TaskEnd::Error(format!("clone failed: {reason}")),
                    Effect::DropPlaceholder { newid },
                    timing.storage_lock_timeout,
                    None,
                )
            }
        },
        None => (
            TaskEnd::Ok,
            Effect::FinishClone {
                newid,
                node: target.clone(),
                config,
                volumes,
            },
            duration,
            None,
        ),
    };
    if matches!(end, TaskEnd::Error(_)) {
        log.clear();
    }

    // The placeholder config that claims the id while the worker runs.
    let placeholder = BTreeMap::from([
        ("lock".to_owned(), "clone".to_owned()),
        (
            "description".to_owned(),
            " qmclone temporary file\n".to_owned(),
        ),
    ]);
    let digest = ctx.state.next_digest(&placeholder);
    ctx.state.vms.insert(
        newid,
        Vm {
            vmid: newid,
            node: node.clone(),
            config: placeholder,
            pending: BTreeMap::new(),
            pending_delete: BTreeSet::new(),
            digest,
            power: Power::Stopped,
            firewall: BTreeMap::new(),
            firewall_digest: crate::state::short_digest(&[b"firewall", &newid.to_be_bytes()]),
            pool,
        },
    );
    let who = ctx.principal();
    let upid = ctx.state.spawn_task(
        TaskSpec {
            node,
            kind: TaskType::Clone,
            id: vmid.to_string(),
            log,
            end,
            effect,
            effect_on_failure: Effect::DropPlaceholder { newid },
            duration,
            slot,
        },
        &who,
        ctx.now,
    );
    Ok(Reply::Data(json!(upid)))
}

/// `3.5 GiB`, as qemu-img's progress lines print sizes.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

// ---------------------------------------------------------------------------------------
// Config

static CONFIG_GET: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        NODE_PARAM,
        VMID,
        Param::opt("current", BOOL),
        Param::opt("snapshot", max_len(40)),
    ]),
    handler: config_get,
};

fn config_get(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?;
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(node, vmid)?;
    ctx.check(&format!("/vms/{vmid}"), &["VM.Audit"])?;
    if let Some(snapshot) = params.str("snapshot") {
        return Err(ApiError::die(format!(
            "snapshot '{snapshot}' does not exist"
        )));
    }
    let mut view = vm.config.clone();
    if !params.flag("current").unwrap_or(false) {
        for (k, v) in &vm.pending {
            view.insert(k.clone(), v.clone());
        }
        for k in &vm.pending_delete {
            view.remove(k);
        }
    }
    let mut out: Map<String, Value> = view
        .iter()
        .map(|(k, v)| (k.clone(), json_value(k, v)))
        .collect();
    out.insert("digest".into(), json!(vm.digest));
    Ok(Reply::Data(Value::Object(out)))
}

static UPDATE_PUT: &[Param] = &[
    NODE_PARAM,
    VMID,
    Param::opt("delete", fmt(Fmt::ConfigIdList)),
    Param::opt("revert", fmt(Fmt::ConfigIdList)),
    Param::opt("digest", max_len(40)),
    Param::opt("skiplock", BOOL),
    Param::opt("force", BOOL).requires("delete"),
];

static UPDATE_POST: &[Param] = &[
    NODE_PARAM,
    VMID,
    Param::opt("delete", fmt(Fmt::ConfigIdList)),
    Param::opt("revert", fmt(Fmt::ConfigIdList)),
    Param::opt("digest", max_len(40)),
    Param::opt("skiplock", BOOL),
    Param::opt("force", BOOL).requires("delete"),
    Param::opt("background_delay", range(1, 30)),
    Param::opt("import-working-storage", STORAGE),
];

static CONFIG_PUT: Endpoint = Endpoint {
    schema: Schema {
        params: UPDATE_PUT,
        dynamic: Some(config_param),
    },
    handler: |ctx, params| update_config(ctx, params, true),
};

static CONFIG_POST: Endpoint = Endpoint {
    schema: Schema {
        params: UPDATE_POST,
        dynamic: Some(config_param),
    },
    handler: |ctx, params| update_config(ctx, params, false),
};

/// The privileges that allow writing `key` (any one of them).
fn privileges_for(key: &str, value: Option<&str>) -> &'static [&'static str] {
    match key {
        "cores" | "sockets" | "cpu" | "cpulimit" | "cpuunits" | "vcpus" | "affinity" | "numa" => {
            &["VM.Config.CPU"]
        }
        "memory" | "balloon" | "shares" => &["VM.Config.Memory"],
        "boot" | "bootdisk" | "efidisk0" | "tpmstate0" => &["VM.Config.Disk"],
        "args" => &["Sys.Root"],
        _ if numbered(key, "net", 31) => &["VM.Config.Network"],
        _ if is_cloudinit_key(key) => &["VM.Config.Cloudinit", "VM.Config.Network"],
        _ if is_disk_key(key) => {
            if value.is_some_and(is_cdrom) {
                &["VM.Config.CDROM"]
            } else {
                &["VM.Config.Disk"]
            }
        }
        _ if numbered(key, "unused", 255) => &["VM.Config.Disk"],
        _ => &["VM.Config.Options"],
    }
}

/// Whether a change of `key` reaches a running VM at once (default `hotplug`:
/// network, disk, usb).
fn hotpluggable(key: &str, old: Option<&str>, new: Option<&str>) -> bool {
    if FAST_PLUG.contains(&key) || numbered(key, "net", 31) {
        return true;
    }
    if is_disk_key(key) {
        let cdrom_swap = new.is_some_and(|n| is_cdrom(n) && !is_cloudinit(n))
            && old.is_some_and(|o| is_cdrom(o) && !is_cloudinit(o));
        let hot_bus = key.starts_with("scsi") || key.starts_with("virtio");
        return cdrom_swap || (hot_bus && old.is_none_or(|o| !is_cdrom(o)));
    }
    false
}

fn update_config(ctx: &mut Ctx<'_>, params: &Params, sync: bool) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?.to_owned();
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(&node, vmid)?.clone();

    let mut changes: BTreeMap<String, String> = params
        .0
        .iter()
        .filter(|(k, _)| !UPDATE_CONTROL.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let deletes: Vec<String> = params
        .str("delete")
        .map(|d| schema::split_list(d).map(str::to_owned).collect())
        .unwrap_or_default();
    let reverts: Vec<String> = params
        .str("revert")
        .map(|d| schema::split_list(d).map(str::to_owned).collect())
        .unwrap_or_default();
    if changes.is_empty() && deletes.is_empty() && reverts.is_empty() {
        return Err(ApiError::die("no options specified"));
    }
    for key in &deletes {
        if changes.contains_key(key) {
            return Err(ApiError::param(
                "delete",
                format!("you can't use '-{key}' and -delete {key}' at the same time"),
            ));
        }
    }

    // Permissions: any VM.Config.* to enter, then per key.
    let vm_path = format!("/vms/{vmid}");
    for (key, value) in &changes {
        ctx.check(&vm_path, privileges_for(key, Some(value)))?;
    }
    for key in &deletes {
        ctx.check(
            &vm_path,
            privileges_for(key, vm.config.get(key).map(String::as_str)),
        )?;
    }

    if let Some(digest) = params.str("digest")
        && digest != vm.digest
    {
        return Err(ApiError::die(
            "detected modified configuration - file changed by other user? Try again.",
        ));
    }
    check_lock(&vm)?;
    check_config_lock(ctx.state, vmid)?;

    // Value checks the schema cannot do.
    if let Some(keys) = changes.get("sshkeys") {
        let text = percent_decode_str(keys).decode_utf8_lossy();
        if !valid_ssh_keys(&text) {
            return Err(ApiError::die("SSH public key validation error"));
        }
    }
    if let Some(password) = changes.get_mut("cipassword") {
        *password = hash_password(password);
    }
    let mut new_volumes = Vec::new();
    for (key, value) in changes.iter_mut() {
        if numbered(key, "net", 31)
            && let Ok(mut net) = propstr::parse(&propstr::NET, key, value)
            && net.get("macaddr").is_none()
        {
            propstr::set(&mut net, "macaddr", &random_mac());
            *value = propstr::render(&propstr::NET, &net);
        }
        if is_disk_key(key) {
            *value = check_drive(ctx, vmid, key, value, &mut new_volumes)?;
        }
    }

    // Apply: at once on a stopped VM, partly pending on a running one.
    let running = vm.is_running();
    let state = &mut *ctx.state;
    let mut freed_cloudinit = Vec::new();
    let mut unused = Vec::new();
    {
        let vm = state
            .vms
            .get_mut(&vmid)
            .ok_or_else(|| super::missing_vm(&node, vmid))?;
        for key in &reverts {
            vm.pending.remove(key);
            vm.pending_delete.remove(key);
        }
        for key in &deletes {
            let old = vm.pending.get(key).or_else(|| vm.config.get(key)).cloned();
            if running && !hotpluggable(key, old.as_deref(), None) {
                vm.pending.remove(key);
                if vm.config.contains_key(key) {
                    vm.pending_delete.insert(key.clone());
                }
                continue;
            }
            vm.pending.remove(key);
            vm.pending_delete.remove(key);
            if let Some(old) = vm.config.remove(key)
                && is_disk_key(key)
            {
                if is_cloudinit(&old) {
                    freed_cloudinit.extend(drive_file(&old));
                } else if !is_cdrom(&old) {
                    unused.extend(drive_file(&old));
                }
            }
        }
        for (key, value) in &changes {
            let old = vm.config.get(key).cloned();
            if running && !hotpluggable(key, old.as_deref(), Some(value)) {
                vm.pending.insert(key.clone(), value.clone());
                vm.pending_delete.remove(key);
                continue;
            }
            vm.pending.remove(key);
            vm.pending_delete.remove(key);
            if let Some(old) = vm.config.insert(key.clone(), value.clone())
                && is_disk_key(key)
                && !is_cdrom(&old)
                && drive_file(&old) != drive_file(value)
            {
                unused.extend(drive_file(&old));
            }
        }
        for file in unused {
            let slot = (0..256)
                .map(|i| format!("unused{i}"))
                .find(|k| !vm.config.contains_key(k))
                .unwrap_or_else(|| "unused255".to_owned());
            vm.config.insert(slot, file);
        }
    }
    for file in freed_cloudinit {
        if let Some((sid, _)) = split_volid(&file)
            && let Some(storage) = state.storages.get_mut(sid)
        {
            storage.volumes.remove(&file);
        }
    }
    for (sid, volume) in new_volumes {
        if let Some(storage) = state.storages.get_mut(&sid) {
            storage.volumes.insert(volume.volid.clone(), volume);
        }
    }
    state.touch(vmid);

    if sync {
        return Ok(Reply::Data(Value::Null));
    }
    let who = ctx.principal();
    let duration = ctx.state.knobs.timing.config;
    let upid = ctx.state.spawn_task(
        TaskSpec {
            node,
            kind: TaskType::Config,
            id: vmid.to_string(),
            log: Vec::new(),
            end: TaskEnd::Ok,
            effect: Effect::Config,
            effect_on_failure: Effect::None,
            duration,
            slot: None,
        },
        &who,
        ctx.now,
    );
    match params.int("background_delay") {
        Some(delay) => Ok(Reply::Await {
            upid,
            wait: Duration::from_secs(delay.unsigned_abs()),
        }),
        None => Ok(Reply::Data(json!(upid))),
    }
}

/// Checks a drive value against the storages, allocating `STORAGE:SIZE` and
/// `STORAGE:cloudinit` volumes. Returns the value to store.
fn check_drive(
    ctx: &Ctx<'_>,
    vmid: u32,
    key: &str,
    value: &str,
    new_volumes: &mut Vec<(String, Volume)>,
) -> Result<String, ApiError> {
    let Ok(mut drive) = propstr::parse(&propstr::DRIVE, key, value) else {
        return Ok(value.to_owned());
    };
    let Some(file) = drive.get("file").map(str::to_owned) else {
        return Ok(value.to_owned());
    };
    let Some((sid, name)) = split_volid(&file) else {
        return Ok(value.to_owned());
    };
    let storage = ctx
        .state
        .storages
        .get(sid)
        .ok_or_else(|| ApiError::die(format!("storage '{sid}' does not exist")))?;
    let cdrom = drive.get("media") == Some("cdrom");
    if name == "cloudinit" {
        let volid = format!("{sid}:vm-{vmid}-cloudinit");
        propstr::set(&mut drive, "file", &volid);
        propstr::set(&mut drive, "media", "cdrom");
        new_volumes.push((
            sid.to_owned(),
            Volume {
                volid,
                content: "images".into(),
                format: "raw".into(),
                size: 4 << 20,
                ctime: epoch_now(),
                vmid: Some(vmid),
                data: None,
            },
        ));
        return Ok(render_drive(&drive));
    }
    if !cdrom && let Ok(gib) = name.parse::<f64>() {
        if !storage.spec.supports("images") {
            return Err(ApiError::die(format!(
                "storage '{sid}' does not support content-type 'images'"
            )));
        }
        let disk = new_disk_name(ctx.state, vmid);
        let size = (gib * f64::from(1u32 << 30)) as u64;
        let volid = format!("{sid}:{disk}");
        propstr::set(&mut drive, "file", &volid);
        propstr::set(&mut drive, "size", &propstr::format_size(size));
        new_volumes.push((
            sid.to_owned(),
            Volume {
                volid,
                content: "images".into(),
                format: "raw".into(),
                size,
                ctime: epoch_now(),
                vmid: Some(vmid),
                data: None,
            },
        ));
        return Ok(render_drive(&drive));
    }
    if cdrom {
        if !storage.spec.supports("iso") && !name.contains("cloudinit") {
            return Err(ApiError::die(format!(
                "storage '{sid}' does not support content-type 'iso'"
            )));
        }
        if !storage.volumes.contains_key(&file) && !name.contains("cloudinit") {
            return Err(ApiError::die(format!("volume '{file}' does not exist")));
        }
    }
    Ok(value.to_owned())
}

fn render_drive(drive: &PropMap) -> String {
    propstr::render(&propstr::DRIVE, drive)
}

// ---------------------------------------------------------------------------------------
// Resize

static RESIZE: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        NODE_PARAM,
        VMID,
        Param::req("disk", Ty::Enum(DISKS)),
        Param::req("size", Ty::Pattern(is_resize_size)),
        Param::opt("digest", max_len(40)),
        Param::opt("skiplock", BOOL),
    ]),
    handler: resize,
};

/// `\+?\d+(\.\d+)?[KMGT]?`
fn is_resize_size(v: &str) -> bool {
    propstr::parse_size(v.strip_prefix('+').unwrap_or(v)).is_some()
}

fn resize(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?.to_owned();
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(&node, vmid)?.clone();
    ctx.check(&format!("/vms/{vmid}"), &["VM.Config.Disk"])?;
    if let Some(digest) = params.str("digest")
        && digest != vm.digest
    {
        return Err(ApiError::die(
            "detected modified configuration - file changed by other user? Try again.",
        ));
    }
    check_lock(&vm)?;
    check_config_lock(ctx.state, vmid)?;
    let disk = params.str("disk").unwrap_or_default().to_owned();
    let value = vm
        .config
        .get(&disk)
        .ok_or_else(|| ApiError::die(format!("disk '{disk}' does not exist")))?;
    if is_cdrom(value) {
        return Err(ApiError::die("you can't resize a cdrom"));
    }
    let size_param = params.str("size").unwrap_or_default();
    let current = drive_size(value).unwrap_or(0);
    let wanted = match size_param.strip_prefix('+') {
        Some(delta) => current + propstr::parse_size(delta).unwrap_or(0),
        None => propstr::parse_size(size_param).unwrap_or(0),
    };
    if wanted < current {
        return Err(ApiError::die("shrinking disks is not supported"));
    }
    let mut drive = propstr::parse(&propstr::DRIVE, &disk, value).unwrap_or_default();
    propstr::set(&mut drive, "size", &propstr::format_size(wanted));
    let new_value = render_drive(&drive);
    let volume = drive_file(value).and_then(|file| {
        let listing = listing_volid(&file)?;
        let (sid, _) = split_volid(&file)?;
        Some((sid.to_owned(), listing, wanted))
    });
    let effect = Effect::Resize {
        vmid,
        key: disk.clone(),
        value: new_value,
        volume,
    };
    let log = one_line_log(format!(
        "  Size of logical volume pve/vm-{vmid}-disk-0 changed from {} to {}.",
        human_size(current),
        human_size(wanted)
    ));
    let who = ctx.principal();
    if ctx.state.knobs.resize_returns_null {
        let upid = ctx.state.spawn_task(
            TaskSpec {
                node,
                kind: TaskType::Resize,
                id: vmid.to_string(),
                log,
                end: TaskEnd::Ok,
                effect,
                effect_on_failure: Effect::None,
                duration: Duration::ZERO,
                slot: None,
            },
            &who,
            ctx.now,
        );
        // PVE 7 ran the resize inline; the task record only keeps the log.
        let failed = ctx
            .state
            .tasks
            .iter()
            .find(|t| t.upid == upid)
            .and_then(|t| match &t.end {
                TaskEnd::Error(msg) => Some(msg.clone()),
                _ => None,
            });
        return match failed {
            Some(msg) => Err(ApiError::die(msg)),
            None => Ok(Reply::Data(Value::Null)),
        };
    }
    let duration = ctx.state.knobs.timing.resize;
    let upid = ctx.state.spawn_task(
        TaskSpec {
            node,
            kind: TaskType::Resize,
            id: vmid.to_string(),
            log,
            end: TaskEnd::Ok,
            effect,
            effect_on_failure: Effect::None,
            duration,
            slot: None,
        },
        &who,
        ctx.now,
    );
    Ok(Reply::Data(json!(upid)))
}

// ---------------------------------------------------------------------------------------
// Power and status

static START: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        NODE_PARAM,
        VMID,
        Param::opt("skiplock", BOOL),
        Param::opt("timeout", UINT),
        Param::opt("machine", STR),
        Param::opt("force-cpu", STR),
        Param::opt("migratedfrom", NODE),
        Param::opt("migration_network", STR),
        Param::opt("migration_type", Ty::Enum(&["secure", "insecure"])),
        Param::opt("stateuri", max_len(128)),
        Param::opt("targetstorage", STR),
        Param::opt("with-conntrack-state", BOOL),
    ]),
    handler: start,
};

static STOP: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        NODE_PARAM,
        VMID,
        Param::opt("skiplock", BOOL),
        Param::opt("timeout", UINT),
        Param::opt("keepActive", BOOL),
        Param::opt("overrule-shutdown", BOOL),
        Param::opt("migratedfrom", NODE),
    ]),
    handler: |ctx, params| stop(ctx, params, TaskType::Stop),
};

static SHUTDOWN: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        NODE_PARAM,
        VMID,
        Param::opt("skiplock", BOOL),
        Param::opt("timeout", UINT),
        Param::opt("keepActive", BOOL),
        Param::opt("forceStop", BOOL),
    ]),
    handler: |ctx, params| stop(ctx, params, TaskType::Shutdown),
};

fn start(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?.to_owned();
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(&node, vmid)?.clone();
    ctx.check(&format!("/vms/{vmid}"), &["VM.PowerMgmt"])?;
    check_lock(&vm)?;
    if vm.is_template() {
        return Err(ApiError::die("you can't start a vm if it's a template"));
    }
    let starting = ctx
        .state
        .tasks
        .iter()
        .any(|t| !t.finished && t.kind == TaskType::Start && t.id == vmid.to_string());
    let (end, effect, duration) = if vm.is_running() || starting {
        (
            TaskEnd::Error(format!("VM {vmid} already running")),
            Effect::None,
            Duration::ZERO,
        )
    } else {
        // Pending values apply at start, so check the config the VM will boot with.
        let mut boot = vm.config.clone();
        boot.extend(vm.pending.clone());
        for key in &vm.pending_delete {
            boot.remove(key);
        }
        let missing = boot
            .iter()
            .filter(|(k, v)| is_disk_key(k) && is_cdrom(v) && !is_cloudinit(v))
            .filter_map(|(_, v)| drive_file(v))
            .find(|file| {
                split_volid(file).is_some_and(|(sid, _)| {
                    ctx.state
                        .storages
                        .get(sid)
                        .is_none_or(|s| !s.volumes.contains_key(file))
                })
            });
        match missing {
            Some(file) => (
                TaskEnd::Error(format!("volume '{file}' does not exist")),
                Effect::None,
                Duration::ZERO,
            ),
            None => (
                TaskEnd::Ok,
                Effect::Start { vmid },
                ctx.state.knobs.timing.start,
            ),
        }
    };
    let who = ctx.principal();
    let upid = ctx.state.spawn_task(
        TaskSpec {
            node,
            kind: TaskType::Start,
            id: vmid.to_string(),
            log: Vec::new(),
            end,
            effect,
            effect_on_failure: Effect::None,
            duration,
            slot: None,
        },
        &who,
        ctx.now,
    );
    Ok(Reply::Data(json!(upid)))
}

fn stop(ctx: &mut Ctx<'_>, params: &Params, kind: TaskType) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?.to_owned();
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(&node, vmid)?.clone();
    ctx.check(&format!("/vms/{vmid}"), &["VM.PowerMgmt"])?;
    check_lock(&vm)?;
    check_config_lock(ctx.state, vmid)?;
    let duration = if vm.is_running() {
        ctx.state.knobs.timing.task(kind)
    } else {
        Duration::ZERO
    };
    let who = ctx.principal();
    let upid = ctx.state.spawn_task(
        TaskSpec {
            node,
            kind,
            id: vmid.to_string(),
            log: Vec::new(),
            end: TaskEnd::Ok,
            effect: Effect::Stop { vmid },
            effect_on_failure: Effect::None,
            duration,
            slot: None,
        },
        &who,
        ctx.now,
    );
    Ok(Reply::Data(json!(upid)))
}

static STATUS_CURRENT: Endpoint = Endpoint {
    schema: Schema::fixed(&[NODE_PARAM, VMID]),
    handler: status_current,
};

fn status_current(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?;
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(node, vmid)?;
    ctx.check(&format!("/vms/{vmid}"), &["VM.Audit"])?;
    let mut out = vm_summary(ctx, vm);
    out.insert("cpus".into(), num(vm.cpus()));
    out.insert("ha".into(), json!({ "managed": 0 }));
    if vm.agent_enabled() {
        out.insert("agent".into(), json!(1));
    }
    match vm.power {
        Power::Running { pid, .. } => {
            out.insert("pid".into(), json!(pid));
            out.insert("qmpstatus".into(), json!("running"));
            out.insert("running-qemu".into(), json!("9.2.0"));
            out.insert("running-machine".into(), json!("pc-i440fx-9.2+pve1"));
        }
        Power::Stopped => {
            out.insert("qmpstatus".into(), json!("stopped"));
        }
    }
    Ok(Reply::Data(Value::Object(out)))
}

// ---------------------------------------------------------------------------------------
// Destroy

static DESTROY: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        NODE_PARAM,
        VMID,
        Param::opt("purge", BOOL),
        Param::opt("destroy-unreferenced-disks", BOOL),
        Param::opt("skiplock", BOOL),
    ]),
    handler: destroy,
};

fn destroy(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?.to_owned();
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(&node, vmid)?.clone();
    ctx.check(&format!("/vms/{vmid}"), &["VM.Allocate"])?;
    check_lock(&vm)?;
    check_config_lock(ctx.state, vmid)?;
    if vm.is_running() {
        return Err(ApiError::die(format!(
            "VM {vmid} is running - destroy failed"
        )));
    }
    let log = ctx
        .state
        .storages
        .values()
        .flat_map(|s| s.volumes.values())
        .filter(|v| v.vmid == Some(vmid) && v.content == "images")
        .map(|v| {
            let name = v.volid.split_once(':').map_or(v.volid.as_str(), |(_, n)| n);
            format!("  Logical volume \"{name}\" successfully removed.")
        })
        .collect();
    if let Some(vm) = ctx.state.vms.get_mut(&vmid) {
        vm.config.insert("lock".into(), "destroyed".into());
    }
    ctx.state.touch(vmid);
    let who = ctx.principal();
    let duration = ctx.state.knobs.timing.destroy;
    let upid = ctx.state.spawn_task(
        TaskSpec {
            node,
            kind: TaskType::Destroy,
            id: vmid.to_string(),
            log,
            end: TaskEnd::Ok,
            effect: Effect::Destroy { vmid },
            effect_on_failure: Effect::None,
            duration,
            slot: None,
        },
        &who,
        ctx.now,
    );
    Ok(Reply::Data(json!(upid)))
}

// ---------------------------------------------------------------------------------------
// Firewall options

static FIREWALL_GET: Endpoint = Endpoint {
    schema: Schema::fixed(&[NODE_PARAM, VMID]),
    handler: firewall_get,
};

const FIREWALL_LOG_LEVELS: &[&str] = &[
    "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug", "nolog",
];
const POLICIES: &[&str] = &["ACCEPT", "REJECT", "DROP"];

static FIREWALL_PUT: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        NODE_PARAM,
        VMID,
        Param::opt("delete", fmt(Fmt::ConfigIdList)),
        Param::opt("digest", max_len(64)),
        Param::opt("enable", BOOL),
        Param::opt("dhcp", BOOL),
        Param::opt("ipfilter", BOOL),
        Param::opt("macfilter", BOOL),
        Param::opt("ndp", BOOL),
        Param::opt("radv", BOOL),
        Param::opt("policy_in", Ty::Enum(POLICIES)),
        Param::opt("policy_out", Ty::Enum(POLICIES)),
        Param::opt("log_level_in", Ty::Enum(FIREWALL_LOG_LEVELS)),
        Param::opt("log_level_out", Ty::Enum(FIREWALL_LOG_LEVELS)),
    ]),
    handler: firewall_put,
};

fn firewall_get(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?;
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(node, vmid)?;
    ctx.check(&format!("/vms/{vmid}"), &["VM.Audit"])?;
    let mut out: Map<String, Value> = vm
        .firewall
        .iter()
        .map(|(k, v)| {
            let value = if k.starts_with("policy") || k.starts_with("log_level") {
                json!(v)
            } else {
                v.parse::<i64>().map_or_else(|_| json!(v), Value::from)
            };
            (k.clone(), value)
        })
        .collect();
    out.insert("digest".into(), json!(vm.firewall_digest));
    Ok(Reply::Data(Value::Object(out)))
}

fn firewall_put(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?.to_owned();
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(&node, vmid)?;
    ctx.check(&format!("/vms/{vmid}"), &["VM.Config.Network"])?;
    if let Some(digest) = params.str("digest")
        && digest != vm.firewall_digest
    {
        return Err(ApiError::die(
            "detected modified configuration - file changed by other user? Try again.",
        ));
    }
    let deletes: Vec<String> = params
        .str("delete")
        .map(|d| schema::split_list(d).map(str::to_owned).collect())
        .unwrap_or_default();
    let sets: Vec<(String, String)> = params
        .0
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "node" | "vmid" | "delete" | "digest"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let counter = ctx.state.next_digest(&BTreeMap::new());
    let vm = ctx
        .state
        .vms
        .get_mut(&vmid)
        .ok_or_else(|| super::missing_vm(&node, vmid))?;
    for key in deletes {
        vm.firewall.remove(&key);
    }
    vm.firewall.extend(sets);
    vm.firewall_digest = crate::state::short_digest(&[b"firewall", counter.as_bytes()]);
    Ok(Reply::Data(Value::Null))
}

// ---------------------------------------------------------------------------------------
// Guest agent

static AGENT_NETWORK: Endpoint = Endpoint {
    schema: Schema::fixed(&[NODE_PARAM, VMID]),
    handler: agent_network,
};

fn link_local(mac: &str) -> Option<String> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|o| u8::from_str_radix(o, 16).ok())
        .collect::<Option<_>>()?;
    let [a, b, c, d, e, f] = bytes.as_slice() else {
        return None;
    };
    Some(format!(
        "fe80::{:02x}{b:02x}:{c:02x}ff:fe{d:02x}:{e:02x}{f:02x}",
        a ^ 0x02
    ))
}

fn agent_network(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?;
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(node, vmid)?;
    if !ctx.has(
        &format!("/vms/{vmid}"),
        &[
            "VM.GuestAgent.Audit",
            "VM.GuestAgent.Unrestricted",
            "VM.Monitor",
        ],
    ) {
        return Err(ApiError::forbidden(
            &format!("/vms/{vmid}"),
            &["VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted"],
        ));
    }
    if !vm.config.get("agent").is_some_and(|a| agent_enabled(a)) {
        return Err(ApiError::die("No QEMU guest agent configured"));
    }
    let Power::Running { agent_ready_at, .. } = vm.power else {
        return Err(ApiError::die(format!("VM {vmid} is not running")));
    };
    match agent_ready_at {
        Some(at) if at <= ctx.now => {}
        _ => return Err(ApiError::die("QEMU guest agent is not running")),
    }
    let statistics = json!({
        "rx-bytes": 120_332, "rx-packets": 1_024, "rx-errs": 0, "rx-dropped": 0,
        "tx-bytes": 40_211, "tx-packets": 512, "tx-errs": 0, "tx-dropped": 0,
    });
    let mut interfaces = vec![json!({
        "name": "lo",
        "hardware-address": "00:00:00:00:00:00",
        "ip-addresses": [
            {"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8},
            {"ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128},
        ],
        "statistics": statistics,
    })];
    let [p0, p1, p2] = ctx.state.knobs.dhcp_prefix;
    for index in 0..32u32 {
        let Some(net) = vm.config.get(&format!("net{index}")) else {
            continue;
        };
        let Some(mac) = propstr::parse(&propstr::NET, "net", net)
            .ok()
            .and_then(|n| n.get("macaddr").map(str::to_ascii_lowercase))
        else {
            continue;
        };
        let mut addresses = Vec::new();
        let configured = vm
            .config
            .get(&format!("ipconfig{index}"))
            .and_then(|c| propstr::parse(&propstr::IPCONFIG, "ipconfig", c).ok());
        let overridden = (index == 0)
            .then(|| ctx.state.guest_addresses.get(&vmid))
            .flatten();
        if let Some(list) = overridden {
            for ip in list {
                let (kind, prefix) = match ip {
                    IpAddr::V4(_) => ("ipv4", 24),
                    IpAddr::V6(_) => ("ipv6", 64),
                };
                addresses.push(json!({"ip-address": ip.to_string(), "ip-address-type": kind, "prefix": prefix}));
            }
        } else {
            let ip = configured
                .as_ref()
                .and_then(|c| c.get("ip").map(str::to_owned));
            match ip.as_deref().and_then(propstr::parse_cidr_v4) {
                Some((addr, prefix)) => addresses.push(json!({
                    "ip-address": addr.to_string(), "ip-address-type": "ipv4", "prefix": prefix,
                })),
                None if ip.as_deref() != Some("manual") => {
                    let host = (vmid % 250) as u8 + 2 + index as u8;
                    let addr = Ipv4Addr::new(p0, p1, p2, host);
                    addresses.push(json!({
                        "ip-address": addr.to_string(), "ip-address-type": "ipv4", "prefix": 24,
                    }));
                }
                None => {}
            }
        }
        if let Some(ll) = link_local(&mac) {
            addresses.push(json!({"ip-address": ll, "ip-address-type": "ipv6", "prefix": 64}));
        }
        interfaces.push(json!({
            "name": format!("eth{index}"),
            "hardware-address": mac,
            "ip-addresses": addresses,
            "statistics": statistics,
        }));
    }
    Ok(Reply::Data(json!({ "result": interfaces })))
}

// ---------------------------------------------------------------------------------------
// Cloud-init

static CLOUDINIT_GET: Endpoint = Endpoint {
    schema: Schema::fixed(&[NODE_PARAM, VMID]),
    handler: cloudinit_get,
};

static CLOUDINIT_PUT: Endpoint = Endpoint {
    schema: Schema::fixed(&[NODE_PARAM, VMID]),
    handler: cloudinit_put,
};

fn cloudinit_get(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?;
    let vmid = vmid(params, "vmid");
    let vm = ctx.vm(node, vmid)?;
    ctx.check(&format!("/vms/{vmid}"), &["VM.Audit"])?;
    let keys: BTreeSet<&String> = vm
        .config
        .keys()
        .chain(vm.pending.keys())
        .chain(vm.pending_delete.iter())
        .filter(|k| is_cloudinit_key(k))
        .collect();
    let shown = |k: &str, v: &str| {
        if k == "cipassword" {
            MASKED_PASSWORD.to_owned()
        } else {
            v.to_owned()
        }
    };
    let list: Vec<Value> = keys
        .into_iter()
        .map(|k| {
            let mut entry = Map::new();
            entry.insert("key".into(), json!(k));
            if let Some(v) = vm.config.get(k) {
                entry.insert("value".into(), json!(shown(k, v)));
            }
            if let Some(v) = vm.pending.get(k) {
                entry.insert("pending".into(), json!(shown(k, v)));
            }
            if vm.pending_delete.contains(k) {
                entry.insert("delete".into(), json!(1));
            }
            Value::Object(entry)
        })
        .collect();
    Ok(Reply::Data(Value::Array(list)))
}

fn cloudinit_put(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?.to_owned();
    let vmid = vmid(params, "vmid");
    ctx.vm(&node, vmid)?;
    ctx.check(&format!("/vms/{vmid}"), &["VM.Config.Cloudinit"])?;
    let vm = ctx
        .state
        .vms
        .get_mut(&vmid)
        .ok_or_else(|| super::missing_vm(&node, vmid))?;
    check_lock(vm)?;
    let keys: Vec<String> = vm
        .pending
        .keys()
        .filter(|k| is_cloudinit_key(k))
        .cloned()
        .collect();
    for key in keys {
        if let Some(v) = vm.pending.remove(&key) {
            vm.config.insert(key, v);
        }
    }
    let deletes: Vec<String> = vm
        .pending_delete
        .iter()
        .filter(|k| is_cloudinit_key(k))
        .cloned()
        .collect();
    for key in deletes {
        vm.pending_delete.remove(&key);
        vm.config.remove(&key);
    }
    ctx.state.touch(vmid);
    Ok(Reply::Data(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g coord@ctl";

    #[test]
    fn ssh_keys_must_carry_their_type_in_the_blob() {
        assert!(valid_ssh_keys(ED25519));
        assert!(valid_ssh_keys(&format!(
            "{ED25519}\n\n# comment\n{ED25519}"
        )));
        assert!(!valid_ssh_keys("ssh-ed25519 notbase64!!"));
        assert!(!valid_ssh_keys("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIG4x"));
        assert!(!valid_ssh_keys("hello world"));
    }

    #[test]
    fn config_values_render_typed() {
        assert_eq!(json_value("cores", "2"), json!(2));
        assert_eq!(json_value("memory", "2048"), json!("2048"));
        assert_eq!(json_value("agent", "1"), json!("1"));
        assert_eq!(json_value("template", "1"), json!(1));
        assert_eq!(json_value("cipassword", "$5$x$y"), json!(MASKED_PASSWORD));
    }

    #[test]
    fn link_local_follows_eui64() {
        assert_eq!(
            link_local("bc:24:11:5a:3c:7e").as_deref(),
            Some("fe80::be24:11ff:fe5a:3c7e")
        );
    }

    #[test]
    fn cdrom_swaps_hotplug_but_cloudinit_keys_wait() {
        assert!(hotpluggable(
            "ide3",
            Some("local:iso/a.iso,media=cdrom"),
            Some("none,media=cdrom")
        ));
        assert!(!hotpluggable("ipconfig0", None, Some("ip=dhcp")));
        assert!(!hotpluggable("agent", Some("0"), Some("1")));
        assert!(hotpluggable("name", Some("a"), Some("b")));
    }
}
