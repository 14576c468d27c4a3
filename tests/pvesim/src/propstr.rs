//! PVE property strings (`virtio=BC:24:11:…,bridge=vmbr0`) and the value formats inside them.
//!
//! Parsing follows `PVE::JSONSchema::parse_property_string`: comma-separated `key=value`
//! parts, one optional key-less part for the default key, key aliases (`virtio=<mac>` means
//! `model=virtio,macaddr=<mac>`), then a schema check of every key. Errors come in the two
//! shapes the server reports: a direct message (unknown or duplicate key) or a list of
//! per-key messages under `format error`.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Why a property string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PropStringError {
    /// The string as a whole is malformed; the text follows `invalid format - `.
    #[error("{0}")]
    Direct(String),
    /// Keys failed their own checks: `(key, message)` pairs, reported under `format error`.
    #[error("format error")]
    Keys(Vec<(String, String)>),
}

/// The value type of one key inside a property string.
#[derive(Debug, Clone, Copy)]
enum KeyType {
    Bool,
    Int { min: i64, max: i64 },
    Num,
    Str,
    Enum(&'static [&'static str]),
    Ipv4Config,
    Ipv6Config,
    Ipv4,
    Ipv6,
    Mac,
    Bridge,
    DiskSize,
    BootLegacy,
    BootOrder,
}

#[derive(Debug, Clone, Copy)]
struct Key {
    name: &'static str,
    ty: KeyType,
    optional: bool,
    default_key: bool,
    requires: Option<&'static str>,
}

const fn key(name: &'static str, ty: KeyType) -> Key {
    Key {
        name,
        ty,
        optional: true,
        default_key: false,
        requires: None,
    }
}

const fn default_key(name: &'static str, ty: KeyType, optional: bool) -> Key {
    Key {
        name,
        ty,
        optional,
        default_key: true,
        requires: None,
    }
}

const fn requiring(name: &'static str, ty: KeyType, requires: &'static str) -> Key {
    Key {
        name,
        ty,
        optional: true,
        default_key: false,
        requires: Some(requires),
    }
}

/// A property string schema.
#[derive(Debug)]
pub(crate) struct PropFormat {
    keys: &'static [Key],
    /// `old name → new name` key aliases.
    aliases: &'static [(&'static str, &'static str)],
    /// `(values, model key, value key)`: a part `virtio=X` sets `model=virtio, macaddr=X`.
    key_alias: Option<(&'static [&'static str], &'static str, &'static str)>,
}

impl PropFormat {
    fn find(&self, name: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.name == name)
    }
}

const NIC_MODELS: &[&str] = &[
    "e1000",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
    "e1000e",
    "i82551",
    "i82557b",
    "i82559er",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
    "rtl8139",
    "virtio",
    "vmxnet3",
];

/// `pve-qm-ipconfig`.
pub(crate) static IPCONFIG: PropFormat = PropFormat {
    keys: &[
        key("ip", KeyType::Ipv4Config),
        requiring("gw", KeyType::Ipv4, "ip"),
        key("ip6", KeyType::Ipv6Config),
        requiring("gw6", KeyType::Ipv6, "ip6"),
    ],
    aliases: &[],
    key_alias: None,
};

/// `netN`.
pub(crate) static NET: PropFormat = PropFormat {
    keys: &[
        default_key("model", KeyType::Enum(NIC_MODELS), false),
        key("macaddr", KeyType::Mac),
        key("bridge", KeyType::Bridge),
        key("firewall", KeyType::Bool),
        key("link_down", KeyType::Bool),
        key("tag", KeyType::Int { min: 1, max: 4094 }),
        key("trunks", KeyType::Str),
        key("rate", KeyType::Num),
        key("queues", KeyType::Int { min: 0, max: 64 }),
        key("mtu", KeyType::Int { min: 1, max: 65520 }),
    ],
    aliases: &[],
    key_alias: Some((NIC_MODELS, "model", "macaddr")),
};

/// `ideN`, `scsiN`, `sataN`, `virtioN`, `efidisk0`, `tpmstate0`, `unusedN`.
pub(crate) static DRIVE: PropFormat = PropFormat {
    keys: &[
        default_key("file", KeyType::Str, false),
        key("media", KeyType::Enum(&["cdrom", "disk"])),
        key("size", KeyType::DiskSize),
        key(
            "format",
            KeyType::Enum(&["raw", "cow", "qcow", "qed", "qcow2", "vmdk", "cloop"]),
        ),
        key(
            "cache",
            KeyType::Enum(&["none", "writethrough", "writeback", "unsafe", "directsync"]),
        ),
        key("discard", KeyType::Enum(&["ignore", "on"])),
        key("aio", KeyType::Enum(&["native", "threads", "io_uring"])),
        key("iothread", KeyType::Bool),
        key("ssd", KeyType::Bool),
        key("backup", KeyType::Bool),
        key("replicate", KeyType::Bool),
        key("ro", KeyType::Bool),
        key("shared", KeyType::Bool),
        key("snapshot", KeyType::Bool),
        key("detect_zeroes", KeyType::Bool),
        key("serial", KeyType::Str),
        key("wwn", KeyType::Str),
        key("model", KeyType::Str),
        key("rerror", KeyType::Str),
        key("werror", KeyType::Str),
        key("import-from", KeyType::Str),
        key("efitype", KeyType::Enum(&["2m", "4m"])),
        key("pre-enrolled-keys", KeyType::Bool),
        key("ms-cert", KeyType::Str),
        key("version", KeyType::Str),
        key("mbps", KeyType::Num),
        key("mbps_rd", KeyType::Num),
        key("mbps_wr", KeyType::Num),
        key(
            "iops",
            KeyType::Int {
                min: 0,
                max: i64::MAX,
            },
        ),
        key(
            "iops_rd",
            KeyType::Int {
                min: 0,
                max: i64::MAX,
            },
        ),
        key(
            "iops_wr",
            KeyType::Int {
                min: 0,
                max: i64::MAX,
            },
        ),
    ],
    aliases: &[("volume", "file")],
    key_alias: None,
};

/// `memory`.
pub(crate) static MEMORY: PropFormat = PropFormat {
    keys: &[default_key(
        "current",
        KeyType::Int {
            min: 16,
            max: i64::MAX,
        },
        true,
    )],
    aliases: &[],
    key_alias: None,
};

/// `agent`.
pub(crate) static AGENT: PropFormat = PropFormat {
    keys: &[
        default_key("enabled", KeyType::Bool, false),
        key("fstrim_cloned_disks", KeyType::Bool),
        key("freeze-fs", KeyType::Bool),
        key("type", KeyType::Enum(&["virtio", "isa"])),
    ],
    aliases: &[
        ("freeze-fs-on-backup", "freeze-fs"),
        ("guest-fsfreeze", "freeze-fs"),
    ],
    key_alias: None,
};

/// `boot`.
pub(crate) static BOOT: PropFormat = PropFormat {
    keys: &[
        default_key("legacy", KeyType::BootLegacy, true),
        key("order", KeyType::BootOrder),
    ],
    aliases: &[],
    key_alias: None,
};

/// The parsed keys of a property string, in the order they appeared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PropMap(pub(crate) Vec<(String, String)>);

impl PropMap {
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses and checks `value` against `format`. `param` names the parameter for `requires`
/// messages.
pub(crate) fn parse(
    format: &PropFormat,
    param: &str,
    value: &str,
) -> Result<PropMap, PropStringError> {
    let mut map: Vec<(String, String)> = Vec::new();
    let has = |map: &Vec<(String, String)>, k: &str| map.iter().any(|(key, _)| key == k);
    for part in value.split(',') {
        if part.trim().is_empty() {
            continue;
        }
        match part.split_once('=') {
            Some((k, v)) => {
                let k = format
                    .aliases
                    .iter()
                    .find(|(from, _)| *from == k)
                    .map_or(k, |(_, to)| *to);
                if let Some((values, model_key, value_key)) = format.key_alias
                    && values.contains(&k)
                {
                    for (name, val) in [(model_key, k), (value_key, v)] {
                        if has(&map, name) {
                            return Err(PropStringError::Direct(format!(
                                "duplicate key in comma-separated list property: {name}"
                            )));
                        }
                        map.push((name.to_owned(), val.to_owned()));
                    }
                    continue;
                }
                if format.find(k).is_none() {
                    return Err(PropStringError::Direct(format!(
                        "invalid key in comma-separated list property: {k}"
                    )));
                }
                if has(&map, k) {
                    return Err(PropStringError::Direct(format!(
                        "duplicate key in comma-separated list property: {k}"
                    )));
                }
                map.push((k.to_owned(), v.to_owned()));
            }
            None => {
                let Some(default) = format.keys.iter().find(|k| k.default_key) else {
                    return Err(PropStringError::Direct(
                        "value without key, but schema does not define a default key".to_owned(),
                    ));
                };
                if has(&map, default.name) {
                    return Err(PropStringError::Direct(format!(
                        "duplicate key in comma-separated list property: {}",
                        default.name
                    )));
                }
                map.push((default.name.to_owned(), part.to_owned()));
            }
        }
    }

    let map = PropMap(map);
    let mut errors = Vec::new();
    for key in format.keys {
        match map.get(key.name) {
            None if !key.optional => errors.push((
                key.name.to_owned(),
                "property is missing and it is not optional".to_owned(),
            )),
            None => {}
            Some(v) => {
                if let Err(msg) = check_key(key.ty, v) {
                    errors.push((key.name.to_owned(), msg));
                }
                if let Some(required) = key.requires
                    && map.get(required).is_none()
                {
                    errors.push((
                        required.to_owned(),
                        format!(
                            "missing property - '{param}.{}' requires this property",
                            key.name
                        ),
                    ));
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(map)
    } else {
        Err(PropStringError::Keys(errors))
    }
}

/// Renders parsed keys back into a property string, using `model=mac` for NICs.
pub(crate) fn render(format: &PropFormat, map: &PropMap) -> String {
    let mut parts = Vec::new();
    let mut skip = Vec::new();
    if let Some((_, model_key, value_key)) = format.key_alias
        && let (Some(model), Some(mac)) = (map.get(model_key), map.get(value_key))
    {
        parts.push(format!("{model}={mac}"));
        skip = vec![model_key, value_key];
    }
    for (k, v) in &map.0 {
        if skip.contains(&k.as_str()) {
            continue;
        }
        let is_default = format.find(k).is_some_and(|key| key.default_key);
        if is_default {
            parts.insert(0, v.clone());
        } else {
            parts.push(format!("{k}={v}"));
        }
    }
    parts.join(",")
}

/// Replaces (or adds) one key.
pub(crate) fn set(map: &mut PropMap, key: &str, value: &str) {
    match map.0.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value.to_owned(),
        None => map.0.push((key.to_owned(), value.to_owned())),
    }
}

/// PVE's property-string boolean: `1|true|yes|on` and `0|false|no|off`.
pub(crate) fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn check_key(ty: KeyType, v: &str) -> Result<(), String> {
    match ty {
        KeyType::Bool => parse_bool(v)
            .map(|_| ())
            .ok_or_else(|| format!("type check ('boolean') failed - got '{v}'")),
        KeyType::Int { min, max } => {
            let n: i64 =
                parse_int(v).ok_or_else(|| format!("type check ('integer') failed - got '{v}'"))?;
            if n < min {
                Err(format!("value must have a minimum value of {min}"))
            } else if n > max {
                Err(format!("value must have a maximum value of {max}"))
            } else {
                Ok(())
            }
        }
        KeyType::Num => {
            if is_number(v) {
                Ok(())
            } else {
                Err(format!("type check ('number') failed - got '{v}'"))
            }
        }
        KeyType::Str => Ok(()),
        KeyType::Enum(values) => {
            if values.contains(&v) {
                Ok(())
            } else {
                Err(enum_error(v, values))
            }
        }
        KeyType::Ipv4Config => check_ipv4_config(v).map_err(invalid_format),
        KeyType::Ipv6Config => check_ipv6_config(v).map_err(invalid_format),
        KeyType::Ipv4 => v
            .parse::<Ipv4Addr>()
            .map(|_| ())
            .map_err(|_| invalid_format("value does not look like a valid IPv4 address".into())),
        KeyType::Ipv6 => v
            .parse::<Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| invalid_format("value does not look like a valid IPv6 address".into())),
        KeyType::Mac => check_mac(v).map_err(invalid_format),
        KeyType::Bridge => {
            if !v.is_empty()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                Ok(())
            } else {
                Err(invalid_format(format!("invalid bridge ID '{v}'")))
            }
        }
        KeyType::DiskSize => parse_size(v)
            .map(|_| ())
            .ok_or_else(|| invalid_format("disk size format error".to_owned())),
        KeyType::BootLegacy => {
            if (1..=4).contains(&v.len()) && v.chars().all(|c| matches!(c, 'a' | 'c' | 'd' | 'n')) {
                Ok(())
            } else {
                Err("value does not match the regex pattern".to_owned())
            }
        }
        KeyType::BootOrder => {
            for device in v.split(';') {
                if !is_boot_device(device) {
                    return Err(invalid_format(format!(
                        "value '{device}' does not look like a valid boot device"
                    )));
                }
            }
            Ok(())
        }
    }
}

fn invalid_format(msg: String) -> String {
    format!("invalid format - {msg}")
}

pub(crate) fn enum_error(v: &str, values: &[&str]) -> String {
    format!(
        "value '{v}' does not have a value in the enumeration '{}'",
        values.join(", ")
    )
}

/// PVE's integer check: optional sign, digits.
pub(crate) fn parse_int(v: &str) -> Option<i64> {
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// PVE's number check.
pub(crate) fn is_number(v: &str) -> bool {
    let body = v.strip_prefix(['+', '-']).unwrap_or(v);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((a, b)) => {
            (!a.is_empty() || !b.is_empty())
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => !mantissa.is_empty() && mantissa.bytes().all(|c| c.is_ascii_digit()),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit())
    });
    mantissa_ok && exponent_ok
}

fn check_ipv4_config(v: &str) -> Result<(), String> {
    if matches!(v, "dhcp" | "manual") || parse_cidr_v4(v).is_some() {
        Ok(())
    } else {
        Err("value does not look like a valid ipv4 network configuration".to_owned())
    }
}

fn check_ipv6_config(v: &str) -> Result<(), String> {
    let cidr_ok = v.split_once('/').is_some_and(|(ip, prefix)| {
        ip.parse::<Ipv6Addr>().is_ok()
            && prefix.bytes().all(|b| b.is_ascii_digit())
            && prefix.parse::<u8>().is_ok_and(|p| (8..=128).contains(&p))
    });
    if matches!(v, "auto" | "dhcp" | "manual") || cidr_ok {
        Ok(())
    } else {
        Err("value does not look like a valid ipv6 network configuration".to_owned())
    }
}

/// `a.b.c.d/nn` with a prefix of 8 to 32.
pub(crate) fn parse_cidr_v4(v: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, prefix) = v.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let prefix: u8 = prefix.parse().ok()?;
    (8..=32).contains(&prefix).then_some((ip, prefix))
}

fn check_mac(v: &str) -> Result<(), String> {
    let octets: Vec<&str> = v.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    let unicast = well_formed && u8::from_str_radix(octets[0], 16).is_ok_and(|b| b & 1 == 0);
    if unicast {
        Ok(())
    } else {
        Err(format!(
            "value '{v}' does not look like a valid unicast MAC address"
        ))
    }
}

fn is_boot_device(device: &str) -> bool {
    let numbered = |prefix: &str, max: u32| {
        device
            .strip_prefix(prefix)
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n <= max)
    };
    numbered("ide", 3)
        || numbered("sata", 5)
        || numbered("scsi", 30)
        || numbered("virtio", 15)
        || numbered("net", 31)
        || numbered("hostpci", 15)
        || numbered("usb", 4)
}

/// Parses `32G`, `3584M`, `1.5T`, `1024` (bytes) into bytes.
pub(crate) fn parse_size(v: &str) -> Option<u64> {
    let (number, unit) = match v.char_indices().last()? {
        (i, c @ ('K' | 'M' | 'G' | 'T')) => (&v[..i], Some(c)),
        _ => (v, None),
    };
    let valid = match number.split_once('.') {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => !number.is_empty() && number.bytes().all(|c| c.is_ascii_digit()),
    };
    if !valid {
        return None;
    }
    let n: f64 = number.parse().ok()?;
    let scale: f64 = match unit {
        None => 1.0,
        Some('K') => 1024.0,
        Some('M') => 1024.0 * 1024.0,
        Some('G') => 1024.0 * 1024.0 * 1024.0,
        Some(_) => 1024.0 * 1024.0 * 1024.0 * 1024.0,
    };
    // Sizes are far below 2^53 bytes, so the float product is exact enough.
    Some((n * scale).round() as u64)
}

/// Formats bytes the way PVE writes `size=`: the largest unit that divides evenly.
pub(crate) fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (scale, unit) in UNITS {
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{}{unit}", bytes / scale);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_key_alias_splits_model_and_mac() {
        let map = parse(
            &NET,
            "net0",
            "virtio=BC:24:11:5A:3C:7E,bridge=vmbr0,firewall=1",
        )
        .unwrap();
        assert_eq!(map.get("model"), Some("virtio"));
        assert_eq!(map.get("macaddr"), Some("BC:24:11:5A:3C:7E"));
        assert_eq!(
            render(&NET, &map),
            "virtio=BC:24:11:5A:3C:7E,bridge=vmbr0,firewall=1"
        );
    }

    #[test]
    fn net_without_model_is_a_key_error() {
        let err = parse(&NET, "net0", "bridge=vmbr0").unwrap_err();
        assert_eq!(
            err,
            PropStringError::Keys(vec![(
                "model".into(),
                "property is missing and it is not optional".into()
            )])
        );
    }

    #[test]
    fn ipconfig_gateway_requires_ip() {
        let err = parse(&IPCONFIG, "ipconfig0", "gw=10.0.0.1").unwrap_err();
        assert_eq!(
            err,
            PropStringError::Keys(vec![(
                "ip".into(),
                "missing property - 'ipconfig0.gw' requires this property".into()
            )])
        );
    }

    #[test]
    fn ipconfig_prefix_must_be_8_to_32() {
        assert!(parse(&IPCONFIG, "ipconfig0", "ip=10.0.0.5/24,gw=10.0.0.1").is_ok());
        assert!(parse(&IPCONFIG, "ipconfig0", "ip=dhcp").is_ok());
        assert!(parse(&IPCONFIG, "ipconfig0", "ip=10.0.0.5/7").is_err());
        assert!(parse(&IPCONFIG, "ipconfig0", "ip=10.0.0.5/33").is_err());
        assert!(parse(&IPCONFIG, "ipconfig0", "ip=10.0.0.5").is_err());
        assert_eq!(
            parse(&IPCONFIG, "ipconfig0", "address=1").unwrap_err(),
            PropStringError::Direct("invalid key in comma-separated list property: address".into())
        );
    }

    #[test]
    fn sizes_round_trip() {
        assert_eq!(parse_size("3584M"), Some(3584 << 20));
        assert_eq!(parse_size("32G"), Some(32 << 30));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("12x"), None);
        assert_eq!(format_size(3584 << 20), "3584M");
        assert_eq!(format_size(32 << 30), "32G");
    }

    #[test]
    fn numbers_and_ints_follow_perl_rules() {
        assert_eq!(parse_int("+12"), Some(12));
        assert_eq!(parse_int("1e3"), None);
        assert!(is_number("1.5"));
        assert!(is_number(".5"));
        assert!(!is_number("abc"));
    }
}
