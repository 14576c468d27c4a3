//! Cluster-wide reads: `/version`, `/nodes`, `/cluster/nextid`, `/cluster/resources`.

use serde_json::{Map, Value, json};

use super::{ApiError, Ctx, Endpoint, Reply, num};
use crate::schema::{Param, Params, Schema, Ty};
use crate::state::{Power, Vm};

/// Memory and CPU figures of the simulated node.
const NODE_MAXCPU: u64 = 16;
const NODE_MAXMEM: u64 = 64 * 1024 * 1024 * 1024;
const NODE_MAXDISK: u64 = 100 * 1024 * 1024 * 1024;
/// The highest id `nextid` hands out (the `datacenter.cfg` default).
const NEXTID_UPPER: u32 = 1_000_000;

pub(super) static VERSION: Endpoint = Endpoint {
    schema: Schema::fixed(&[]),
    handler: version,
};

fn version(ctx: &mut Ctx<'_>, _: &Params) -> Result<Reply, ApiError> {
    let version = &ctx.shared.version;
    let release = version.split('.').take(2).collect::<Vec<_>>().join(".");
    Ok(Reply::Data(json!({
        "version": version,
        "release": release,
        "repoid": "5c9e4ea1",
        "console": "xtermjs",
    })))
}

pub(super) static NODES: Endpoint = Endpoint {
    schema: Schema::fixed(&[]),
    handler: nodes,
};

fn uptime(ctx: &Ctx<'_>) -> u64 {
    904_233 + ctx.now.duration_since(ctx.shared.started).as_secs()
}

fn node_entry(ctx: &Ctx<'_>, node: &str) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("id".into(), json!(format!("node/{node}")));
    entry.insert("type".into(), json!("node"));
    entry.insert("node".into(), json!(node));
    entry.insert("status".into(), json!("online"));
    entry.insert("cpu".into(), json!(0.031));
    entry.insert("maxcpu".into(), num(NODE_MAXCPU));
    entry.insert("mem".into(), num(8_123_456_512));
    entry.insert("maxmem".into(), num(NODE_MAXMEM));
    entry.insert("disk".into(), num(12_884_901_888));
    entry.insert("maxdisk".into(), num(NODE_MAXDISK));
    entry.insert("uptime".into(), num(uptime(ctx)));
    entry.insert("level".into(), json!(""));
    entry
}

fn nodes(ctx: &mut Ctx<'_>, _: &Params) -> Result<Reply, ApiError> {
    let list: Vec<Value> = ctx
        .state
        .nodes
        .iter()
        .map(|node| {
            let mut entry = node_entry(ctx, node);
            entry.insert(
                "ssl_fingerprint".into(),
                json!(ctx.shared.fingerprint.clone()),
            );
            Value::Object(entry)
        })
        .collect();
    Ok(Reply::Data(Value::Array(list)))
}

pub(super) static NEXTID: Endpoint = Endpoint {
    schema: Schema::fixed(&[Param::opt("vmid", Ty::VmId)]),
    handler: nextid,
};

fn nextid(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    if params.str("vmid").is_some() {
        let vmid = super::vmid(params, "vmid");
        if ctx.state.vms.contains_key(&vmid) {
            return Err(ApiError::param("vmid", format!("VM {vmid} already exists")));
        }
        return Ok(Reply::Data(json!(vmid.to_string())));
    }
    if ctx.state.faults.nextid_race
        && let Some(last) = ctx.state.faults.last_nextid
    {
        return Ok(Reply::Data(json!(last.to_string())));
    }
    let lower = ctx.state.knobs.nextid_lower;
    let free = (lower..NEXTID_UPPER)
        .find(|id| !ctx.state.vms.contains_key(id))
        .ok_or_else(|| ApiError::die("unable to get any free VMID in range"))?;
    ctx.state.faults.last_nextid = Some(free);
    Ok(Reply::Data(json!(free.to_string())))
}

pub(super) static RESOURCES: Endpoint = Endpoint {
    schema: Schema::fixed(&[Param::opt(
        "type",
        Ty::Enum(&["vm", "storage", "node", "sdn"]),
    )]),
    handler: resources,
};

/// The fields `/cluster/resources` and `/nodes/{node}/qemu` share.
pub(super) fn vm_summary(ctx: &Ctx<'_>, vm: &Vm) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("vmid".into(), json!(vm.vmid));
    if let Some(name) = vm.name() {
        entry.insert("name".into(), json!(name));
    }
    let (status, uptime, mem, cpu) = match vm.power {
        Power::Running { since, .. } => (
            "running",
            ctx.now.saturating_duration_since(since).as_secs(),
            vm.memory_mib() * 1024 * 1024 / 4,
            0.021,
        ),
        Power::Stopped => ("stopped", 0, 0, 0.0),
    };
    entry.insert("status".into(), json!(status));
    entry.insert("uptime".into(), num(uptime));
    entry.insert("mem".into(), num(mem));
    entry.insert("cpu".into(), json!(cpu));
    entry.insert("maxmem".into(), num(vm.memory_mib() * 1024 * 1024));
    entry.insert("maxdisk".into(), num(vm.maxdisk()));
    entry.insert("disk".into(), num(0));
    entry.insert("netin".into(), num(0));
    entry.insert("netout".into(), num(0));
    entry.insert("diskread".into(), num(0));
    entry.insert("diskwrite".into(), num(0));
    if vm.is_template() {
        entry.insert("template".into(), json!(1));
    }
    if let Some(lock) = vm.lock() {
        entry.insert("lock".into(), json!(lock));
    }
    if let Some(tags) = vm.config.get("tags") {
        entry.insert("tags".into(), json!(tags));
    }
    entry
}

/// Whether the caller may see VM `vm` (`VM.Audit` on it or its pool).
pub(super) fn may_audit(ctx: &Ctx<'_>, vm: &Vm) -> bool {
    ctx.has(&format!("/vms/{}", vm.vmid), &["VM.Audit"])
        || vm
            .pool
            .as_ref()
            .is_some_and(|p| ctx.has(&format!("/pool/{p}"), &["VM.Audit"]))
}

fn resources(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let kind = params.str("type");
    let mut list = Vec::new();
    if kind.is_none() || kind == Some("vm") {
        for vm in ctx.state.vms.values().filter(|vm| may_audit(ctx, vm)) {
            let mut entry = vm_summary(ctx, vm);
            entry.insert("id".into(), json!(format!("qemu/{}", vm.vmid)));
            entry.insert("type".into(), json!("qemu"));
            entry.insert("node".into(), json!(vm.node));
            entry.insert("maxcpu".into(), num(vm.cpus()));
            if let Some(pool) = &vm.pool {
                entry.insert("pool".into(), json!(pool));
            }
            list.push(Value::Object(entry));
        }
    }
    if kind.is_none() || kind == Some("node") {
        for node in &ctx.state.nodes {
            list.push(Value::Object(node_entry(ctx, node)));
        }
    }
    if kind.is_none() || kind == Some("storage") {
        for node in &ctx.state.nodes {
            for (sid, storage) in &ctx.state.storages {
                if !ctx.has(
                    &format!("/storage/{sid}"),
                    &["Datastore.Audit", "Datastore.AllocateSpace"],
                ) {
                    continue;
                }
                let used: u64 = storage.volumes.values().map(|v| v.size).sum();
                list.push(json!({
                    "id": format!("storage/{node}/{sid}"),
                    "type": "storage",
                    "storage": sid,
                    "node": node,
                    "status": "available",
                    "plugintype": storage.spec.kind.as_str(),
                    "content": storage.spec.content.join(","),
                    "shared": u8::from(storage.spec.shared),
                    "disk": used,
                    "maxdisk": NODE_MAXDISK,
                }));
            }
        }
    }
    Ok(Reply::Data(Value::Array(list)))
}
