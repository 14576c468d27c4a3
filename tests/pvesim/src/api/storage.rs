//! `/nodes/{node}/storage/{storage}/…`: content list, upload and volume delete.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

use super::{ApiError, Ctx, Endpoint, Reply};
use crate::config::TaskType;
use crate::schema::{NODE, Param, Params, STORAGE, STR, Schema, Ty, max_len, range};
use crate::state::{Effect, TaskEnd, TaskSpec, Volume, epoch_now};

/// Where an ISO 9660 image carries its `CD001` signature.
const ISO_MAGIC_OFFSET: usize = 32769;

pub(super) static CONTENT: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        Param::req("node", NODE),
        Param::req("storage", STORAGE),
        Param::opt(
            "content",
            Ty::Enum(&[
                "images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import",
            ]),
        ),
        Param::opt("vmid", Ty::VmId),
    ]),
    handler: content,
};

fn content(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    ctx.node(params)?;
    let sid = params.str("storage").unwrap_or_default();
    let storage = ctx
        .state
        .storages
        .get(sid)
        .ok_or_else(|| ApiError::die(format!("storage '{sid}' does not exist")))?;
    ctx.check(
        &format!("/storage/{sid}"),
        &["Datastore.Audit", "Datastore.AllocateSpace"],
    )?;
    let filter = params.str("content");
    let vmid = params.int("vmid").and_then(|v| u32::try_from(v).ok());
    let list: Vec<Value> = storage
        .volumes
        .values()
        .filter(|v| filter.is_none_or(|c| v.content == c))
        .filter(|v| vmid.is_none_or(|id| v.vmid == Some(id)))
        .map(|v| {
            let mut entry = Map::new();
            entry.insert("volid".into(), json!(v.volid));
            entry.insert("content".into(), json!(v.content));
            entry.insert("format".into(), json!(v.format));
            entry.insert("size".into(), json!(v.size));
            entry.insert("ctime".into(), json!(v.ctime));
            if let Some(id) = v.vmid {
                entry.insert("vmid".into(), json!(id));
            }
            Value::Object(entry)
        })
        .collect();
    Ok(Reply::Data(Value::Array(list)))
}

pub(super) static UPLOAD: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        Param::req("node", NODE),
        Param::req("storage", STORAGE),
        Param::req("content", Ty::Enum(&["iso", "vztmpl", "import"])),
        Param::req("filename", max_len(255)),
        Param::opt("checksum", STR).requires("checksum-algorithm"),
        Param::opt(
            "checksum-algorithm",
            Ty::Enum(&["md5", "sha1", "sha224", "sha256", "sha384", "sha512"]),
        )
        .requires("checksum"),
        Param::opt("tmpfilename", Ty::Pattern(is_tmpfilename)),
    ]),
    handler: upload,
};

/// `/var/tmp/pveupload-[0-9a-f]+`
fn is_tmpfilename(v: &str) -> bool {
    v.strip_prefix("/var/tmp/pveupload-")
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Each character outside `[a-zA-Z0-9_.-]` becomes `_`.
pub(crate) fn normalize_filename(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn extension_ok(content: &str, name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let allowed: &[&str] = match content {
        "iso" => &[".iso", ".img"],
        "vztmpl" => &[".tar.gz", ".tar.xz", ".tar.zst", ".tgz"],
        _ => &[".ova", ".ovf", ".qcow2", ".raw", ".vmdk", ".img"],
    };
    allowed.iter().any(|ext| lower.ends_with(ext))
}

fn checksum(algorithm: &str, data: &[u8]) -> Option<String> {
    Some(match algorithm {
        "sha224" => hex::encode(Sha224::digest(data)),
        "sha256" => hex::encode(Sha256::digest(data)),
        "sha384" => hex::encode(Sha384::digest(data)),
        "sha512" => hex::encode(Sha512::digest(data)),
        // md5 and sha1 are accepted unverified: no second hash crate for a simulator.
        _ => return None,
    })
}

fn upload(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?.to_owned();
    let sid = params.str("storage").unwrap_or_default().to_owned();
    let storage = ctx
        .state
        .storages
        .get(&sid)
        .ok_or_else(|| ApiError::die(format!("storage '{sid}' does not exist")))?;
    ctx.check(&format!("/storage/{sid}"), &["Datastore.AllocateTemplate"])?;
    let content = params.str("content").unwrap_or_default().to_owned();
    if !storage.spec.kind.path_based() {
        return Err(ApiError::die(format!(
            "can't upload to storage type '{}'",
            storage.spec.kind.as_str()
        )));
    }
    if !storage.spec.supports(&content) {
        return Err(ApiError::die(format!(
            "storage '{sid}' does not support '{content}' content"
        )));
    }
    let filename = normalize_filename(params.str("filename").unwrap_or_default());
    if !extension_ok(&content, &filename) {
        return Err(ApiError::param("filename", "wrong file extension"));
    }
    let data = ctx.upload.take().map(|u| u.data).unwrap_or_default();
    let dir = storage.content_dir(&content);
    let target = format!("{dir}/{filename}");
    let tmp = format!(
        "/var/tmp/pveupload-{}",
        crate::state::short_digest(&[filename.as_bytes(), &epoch_now().to_be_bytes()])
    );
    let mut log = vec![
        format!("starting file import from: {tmp}"),
        format!("target node: {node}"),
        format!("target file: {target}"),
        format!("file size is: {}", data.len()),
    ];
    let mut end = TaskEnd::Ok;
    if let (Some(expected), Some(algorithm)) =
        (params.str("checksum"), params.str("checksum-algorithm"))
    {
        log.push("calculating checksum...".to_owned());
        match checksum(algorithm, &data) {
            Some(got) if !got.eq_ignore_ascii_case(expected) => {
                end = TaskEnd::Error(format!(
                    "checksum mismatch: got '{got}' != expect '{expected}'"
                ));
            }
            _ => log.push("checksum verified".to_owned()),
        }
    }
    if end == TaskEnd::Ok
        && content == "iso"
        && ctx.state.knobs.check_iso_magic
        && data.get(ISO_MAGIC_OFFSET..ISO_MAGIC_OFFSET + 5) != Some(b"CD001".as_slice())
    {
        end = TaskEnd::Error(format!("file '{filename}' is not a valid ISO 9660 image"));
    }
    let effect = if end == TaskEnd::Ok {
        log.push(format!("command: cp -- {tmp} {target}"));
        log.push("finished file import successfully".to_owned());
        let format = match content.as_str() {
            "iso" => "iso".to_owned(),
            _ => filename
                .rsplit('.')
                .next()
                .unwrap_or("raw")
                .to_ascii_lowercase(),
        };
        Effect::Store {
            storage: sid.clone(),
            volume: Volume {
                volid: format!("{sid}:{content}/{filename}"),
                content: content.clone(),
                format,
                size: data.len() as u64,
                ctime: epoch_now(),
                vmid: None,
                data: Some(Arc::from(data)),
            },
        }
    } else {
        Effect::None
    };
    let who = ctx.principal();
    let duration = ctx.state.knobs.timing.upload;
    let upid = ctx.state.spawn_task(
        TaskSpec {
            node,
            kind: TaskType::Upload,
            id: String::new(),
            log,
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

pub(super) static DELETE_VOLUME: Endpoint = Endpoint {
    schema: Schema::fixed(&[
        Param::req("node", NODE),
        Param::opt("storage", STORAGE),
        Param::req("volume", STR),
        Param::opt("delay", range(1, 30)),
    ]),
    handler: delete_volume,
};

fn delete_volume(ctx: &mut Ctx<'_>, params: &Params) -> Result<Reply, ApiError> {
    let node = ctx.node(params)?.to_owned();
    let sid = params.str("storage").unwrap_or_default().to_owned();
    let volume = params.str("volume").unwrap_or_default();
    let volid = match volume.split_once(':') {
        Some((owner, _)) if owner != sid => {
            return Err(ApiError::die(format!(
                "storage ID mismatch ({owner} != {sid})"
            )));
        }
        Some(_) => volume.to_owned(),
        None => format!("{sid}:{volume}"),
    };
    let storage = ctx
        .state
        .storages
        .get(&sid)
        .ok_or_else(|| ApiError::die(format!("storage '{sid}' does not exist")))?;
    ctx.check(&format!("/storage/{sid}"), &["Datastore.Allocate"])?;
    let (log, end, effect) = match storage.volumes.get(&volid) {
        Some(v) => (
            vec![format!("Removed volume '{volid}'")],
            TaskEnd::Ok,
            Effect::Remove {
                storage: sid.clone(),
                volid: v.volid.clone(),
            },
        ),
        None => {
            let name = volid.split_once(':').map_or(volid.as_str(), |(_, n)| n);
            let path = match name.split_once('/') {
                Some((content, file)) => format!("{}/{file}", storage.content_dir(content)),
                None => format!("/dev/pve/{name}"),
            };
            (
                vec![format!("WARN: disk image '{path}' does not exist")],
                TaskEnd::Warnings(1),
                Effect::None,
            )
        }
    };
    let who = ctx.principal();
    let duration = ctx.state.knobs.timing.volume_delete;
    let upid = ctx.state.spawn_task(
        TaskSpec {
            node,
            kind: TaskType::VolumeDelete,
            id: sid,
            log,
            end,
            effect,
            effect_on_failure: Effect::None,
            duration,
            slot: None,
        },
        &who,
        ctx.now,
    );
    match params.int("delay") {
        Some(delay) => Ok(Reply::Await {
            upid,
            wait: Duration::from_secs(delay.unsigned_abs()),
        }),
        None => Ok(Reply::Data(json!(upid))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_are_normalized_and_extensions_checked() {
        assert_eq!(normalize_filename("seed 123(1).iso"), "seed_123_1_.iso");
        assert!(extension_ok("iso", "seed-1.ISO"));
        assert!(extension_ok("iso", "disk.img"));
        assert!(!extension_ok("iso", "seed.txt"));
        assert!(is_tmpfilename("/var/tmp/pveupload-0a1b"));
    }
}
