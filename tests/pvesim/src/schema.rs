//! Parameter schemas and the checks behind `400 Parameter verification failed.`.
//!
//! Each endpoint declares its parameters as a [`Schema`]; [`validate`] turns the raw request
//! parameters into [`Params`] or a map of per-parameter messages worded like
//! `PVE::JSONSchema`. Format errors end in `\n` (they come from a Perl `die`), the others do
//! not, as on the real server.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::propstr::{self, PropFormat, PropStringError};

/// A request parameter as it arrived.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawValue {
    /// From a query string, form body or multipart field.
    Text(String),
    /// From a JSON body, still typed.
    Json(Value),
}

/// String parameter formats the simulator checks.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fmt {
    Any,
    Node,
    DnsName,
    UrlEncoded,
    StorageId,
    ConfigIdList,
    PoolId,
    TagList,
    AddressList,
    Prop(&'static PropFormat),
}

/// A parameter's type.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ty {
    Bool,
    Int {
        min: Option<i64>,
        max: Option<i64>,
    },
    VmId,
    Num {
        min: Option<f64>,
        max: Option<f64>,
    },
    Str {
        fmt: Fmt,
        max_len: Option<usize>,
    },
    Enum(&'static [&'static str]),
    /// An anchored regex, checked by a function.
    Pattern(fn(&str) -> bool),
}

/// One parameter of an endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Param {
    pub(crate) name: &'static str,
    pub(crate) ty: Ty,
    pub(crate) optional: bool,
    pub(crate) requires: Option<&'static str>,
}

impl Param {
    pub(crate) const fn req(name: &'static str, ty: Ty) -> Self {
        Self {
            name,
            ty,
            optional: false,
            requires: None,
        }
    }

    pub(crate) const fn opt(name: &'static str, ty: Ty) -> Self {
        Self {
            name,
            ty,
            optional: true,
            requires: None,
        }
    }

    pub(crate) const fn requires(mut self, other: &'static str) -> Self {
        self.requires = Some(other);
        self
    }
}

pub(crate) const BOOL: Ty = Ty::Bool;
pub(crate) const UINT: Ty = Ty::Int {
    min: Some(0),
    max: None,
};
pub(crate) const STR: Ty = Ty::Str {
    fmt: Fmt::Any,
    max_len: None,
};
pub(crate) const NODE: Ty = Ty::Str {
    fmt: Fmt::Node,
    max_len: None,
};
pub(crate) const STORAGE: Ty = Ty::Str {
    fmt: Fmt::StorageId,
    max_len: None,
};

pub(crate) const fn fmt(fmt: Fmt) -> Ty {
    Ty::Str { fmt, max_len: None }
}

pub(crate) const fn max_len(max: usize) -> Ty {
    Ty::Str {
        fmt: Fmt::Any,
        max_len: Some(max),
    }
}

pub(crate) const fn range(min: i64, max: i64) -> Ty {
    Ty::Int {
        min: Some(min),
        max: Some(max),
    }
}

/// An endpoint's parameters: a fixed list plus, for config keys like `net0`, a lookup.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schema {
    pub(crate) params: &'static [Param],
    pub(crate) dynamic: Option<fn(&str) -> Option<Param>>,
}

impl Schema {
    pub(crate) const fn fixed(params: &'static [Param]) -> Self {
        Self {
            params,
            dynamic: None,
        }
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<Param> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .copied()
            .or_else(|| self.dynamic.and_then(|f| f(name)))
    }
}

/// Validated parameters: every value normalized to its string form (booleans `0`/`1`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Params(pub(crate) BTreeMap<String, String>);

impl Params {
    pub(crate) fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub(crate) fn flag(&self, name: &str) -> Option<bool> {
        self.str(name).map(|v| v == "1")
    }

    pub(crate) fn int(&self, name: &str) -> Option<i64> {
        self.str(name).and_then(|v| v.parse().ok())
    }
}

/// Per-parameter error messages.
pub(crate) type ParamErrors = BTreeMap<String, String>;

const NOT_IN_SCHEMA: &str =
    "property is not defined in schema and the schema does not allow additional properties";
const MISSING: &str = "property is missing and it is not optional";

/// Checks `raw` against `schema`.
pub(crate) fn validate(
    schema: &Schema,
    raw: &BTreeMap<String, RawValue>,
) -> Result<Params, ParamErrors> {
    let mut errors = ParamErrors::new();
    let mut out = BTreeMap::new();
    let mut present = Vec::new();
    for (name, value) in raw {
        let Some(param) = schema.lookup(name) else {
            errors.insert(name.clone(), NOT_IN_SCHEMA.to_owned());
            continue;
        };
        present.push(param);
        match check(name, &param, value) {
            Ok(v) => {
                out.insert(name.clone(), v);
            }
            Err(msg) => {
                errors.insert(name.clone(), msg);
            }
        }
    }
    for param in schema.params {
        if !param.optional && !raw.contains_key(param.name) {
            errors.insert(param.name.to_owned(), MISSING.to_owned());
        }
    }
    for param in present {
        if let Some(required) = param.requires
            && !raw.contains_key(required)
        {
            errors.insert(
                required.to_owned(),
                format!("missing property - '{}' requires this property", param.name),
            );
        }
    }
    if errors.is_empty() {
        Ok(Params(out))
    } else {
        Err(errors)
    }
}

fn type_name(ty: &Ty) -> &'static str {
    match ty {
        Ty::Bool => "boolean",
        Ty::Int { .. } | Ty::VmId => "integer",
        Ty::Num { .. } => "number",
        Ty::Str { .. } | Ty::Enum(_) | Ty::Pattern(_) => "string",
    }
}

/// The value as Perl would see it: JSON scalars become strings, structures stay apart.
fn as_text(value: &RawValue, ty: &Ty) -> Result<String, String> {
    match value {
        RawValue::Text(s) => Ok(s.clone()),
        RawValue::Json(Value::String(s)) => Ok(s.clone()),
        RawValue::Json(Value::Number(n)) => Ok(n.to_string()),
        RawValue::Json(Value::Bool(b)) => Ok(if *b { "1" } else { "0" }.to_owned()),
        RawValue::Json(Value::Null) => Ok(String::new()),
        RawValue::Json(Value::Array(_)) => Err(format!(
            "type check ('{}') failed - got ARRAY",
            type_name(ty)
        )),
        RawValue::Json(Value::Object(_)) => Err(format!(
            "type check ('{}') failed - got HASH",
            type_name(ty)
        )),
    }
}

fn check(name: &str, param: &Param, value: &RawValue) -> Result<String, String> {
    let ty = &param.ty;
    if let (Ty::Bool, RawValue::Json(Value::Bool(b))) = (ty, value) {
        return Ok(if *b { "1" } else { "0" }.to_owned());
    }
    let text = as_text(value, ty)?;
    match ty {
        Ty::Bool => match text.as_str() {
            "0" | "1" => Ok(text),
            _ => Err(format!("type check ('boolean') failed - got '{text}'")),
        },
        Ty::Int { min, max } => {
            let n = propstr::parse_int(&text)
                .ok_or_else(|| format!("type check ('integer') failed - got '{text}'"))?;
            check_range(n as f64, min.map(|m| m as f64), max.map(|m| m as f64))?;
            Ok(n.to_string())
        }
        Ty::VmId => {
            let n = propstr::parse_int(&text)
                .ok_or_else(|| format!("type check ('integer') failed - got '{text}'"))?;
            if !is_vmid(&text) {
                return Err("invalid format - value does not look like a valid VM ID\n".to_owned());
            }
            check_range(n as f64, Some(100.0), Some(999_999_999.0))?;
            Ok(n.to_string())
        }
        Ty::Num { min, max } => {
            if !propstr::is_number(&text) {
                return Err(format!("type check ('number') failed - got '{text}'"));
            }
            let n: f64 = text
                .parse()
                .map_err(|_| format!("type check ('number') failed - got '{text}'"))?;
            check_range(n, *min, *max)?;
            Ok(text)
        }
        Ty::Str { fmt, max_len } => {
            if let Some(max) = max_len
                && text.chars().count() > *max
            {
                return Err(format!("value may only be {max} characters long"));
            }
            check_format(*fmt, name, &text)?;
            Ok(text)
        }
        Ty::Enum(values) => {
            if values.contains(&text.as_str()) {
                Ok(text)
            } else {
                Err(propstr::enum_error(&text, values))
            }
        }
        Ty::Pattern(matches) => {
            if matches(&text) {
                Ok(text)
            } else {
                Err("value does not match the regex pattern".to_owned())
            }
        }
    }
}

fn check_range(n: f64, min: Option<f64>, max: Option<f64>) -> Result<(), String> {
    if let Some(min) = min
        && n < min
    {
        return Err(format!("value must have a minimum value of {min}"));
    }
    if let Some(max) = max
        && n > max
    {
        return Err(format!("value must have a maximum value of {max}"));
    }
    Ok(())
}

/// `^[1-9][0-9]{2,8}$`
pub(crate) fn is_vmid(v: &str) -> bool {
    let b = v.as_bytes();
    (3..=9).contains(&b.len()) && b[0] != b'0' && b.iter().all(u8::is_ascii_digit)
}

/// One DNS label: alphanumerics, inner hyphens.
fn is_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

pub(crate) fn is_dns_name(v: &str) -> bool {
    v.split('.').all(is_label)
}

/// `^[-%a-zA-Z0-9_.!~*'()]*$`
pub(crate) fn is_urlencoded(v: &str) -> bool {
    v.bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"-%_.!~*'()".contains(&c))
}

fn check_format(fmt: Fmt, name: &str, v: &str) -> Result<(), String> {
    let invalid = |msg: String| Err(format!("invalid format - {msg}\n"));
    match fmt {
        Fmt::Any => Ok(()),
        Fmt::Node => {
            if is_label(v) {
                Ok(())
            } else {
                invalid("value does not look like a valid node name".to_owned())
            }
        }
        Fmt::DnsName => {
            if is_dns_name(v) {
                Ok(())
            } else {
                invalid("value does not look like a valid DNS name".to_owned())
            }
        }
        Fmt::UrlEncoded => {
            if is_urlencoded(v) {
                Ok(())
            } else {
                invalid(format!("invalid urlencoded string: {v}"))
            }
        }
        Fmt::StorageId => {
            let b = v.as_bytes();
            let ok = b.len() >= 2
                && b[0].is_ascii_lowercase()
                && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(c));
            if ok {
                Ok(())
            } else {
                invalid(format!("storage ID '{v}' contains illegal characters"))
            }
        }
        Fmt::ConfigIdList => {
            for id in split_list(v) {
                let b = id.as_bytes();
                let ok = b.len() >= 2
                    && b[0].is_ascii_lowercase()
                    && b.iter()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
                if !ok {
                    return invalid(format!("invalid configuration ID '{id}'"));
                }
            }
            Ok(())
        }
        Fmt::PoolId => {
            if !v.is_empty()
                && v.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                Ok(())
            } else {
                invalid(format!("invalid pool ID '{v}'"))
            }
        }
        Fmt::TagList => {
            for tag in v.split([';', ',', ' ']).filter(|t| !t.is_empty()) {
                let b = tag.as_bytes();
                let ok = (b[0].is_ascii_alphanumeric() || b[0] == b'_')
                    && b.iter()
                        .all(|c| c.is_ascii_alphanumeric() || b"_-+.".contains(c));
                if !ok {
                    return invalid(format!("invalid tag '{tag}'"));
                }
            }
            Ok(())
        }
        Fmt::AddressList => {
            for addr in split_list(v) {
                if addr.parse::<std::net::IpAddr>().is_err() {
                    return invalid(format!("unable to parse address '{addr}'"));
                }
            }
            Ok(())
        }
        Fmt::Prop(format) => match propstr::parse(format, name, v) {
            Ok(_) => Ok(()),
            Err(PropStringError::Direct(msg)) => invalid(msg),
            Err(PropStringError::Keys(keys)) => {
                let mut text = "invalid format - format error\n".to_owned();
                for (key, msg) in keys {
                    text.push_str(&format!("{name}.{key}: {}\n", msg.trim_end()));
                }
                Err(text)
            }
        },
    }
}

/// `PVE::Tools::split_list`: separators are whitespace, `,`, `;` and NUL.
pub(crate) fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '\0'))
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    static SCHEMA: Schema = Schema::fixed(&[
        Param::req("newid", Ty::VmId),
        Param::opt("name", fmt(Fmt::DnsName)),
        Param::opt("full", BOOL),
        Param::opt("checksum", STR).requires("checksum-algorithm"),
        Param::opt("checksum-algorithm", Ty::Enum(&["md5", "sha256"])),
    ]);

    fn raw(pairs: &[(&str, &str)]) -> BTreeMap<String, RawValue> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), RawValue::Text((*v).to_owned())))
            .collect()
    }

    #[test]
    fn errors_are_worded_like_pve() {
        let errors = validate(
            &SCHEMA,
            &raw(&[
                ("newid", "42"),
                ("name", "worker_01"),
                ("full", "true"),
                ("bogus", "1"),
                ("checksum", "abc"),
            ]),
        )
        .unwrap_err();
        assert_eq!(
            errors["newid"],
            "invalid format - value does not look like a valid VM ID\n"
        );
        assert_eq!(
            errors["name"],
            "invalid format - value does not look like a valid DNS name\n"
        );
        assert_eq!(errors["full"], "type check ('boolean') failed - got 'true'");
        assert_eq!(errors["bogus"], NOT_IN_SCHEMA);
        assert_eq!(
            errors["checksum-algorithm"],
            "missing property - 'checksum' requires this property"
        );
    }

    #[test]
    fn json_booleans_pass_and_missing_params_are_named() {
        let mut input = BTreeMap::new();
        input.insert("full".to_owned(), RawValue::Json(Value::Bool(true)));
        let errors = validate(&SCHEMA, &input).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors["newid"], MISSING);
        input.insert("newid".to_owned(), RawValue::Json(Value::from(123)));
        let params = validate(&SCHEMA, &input).unwrap();
        assert_eq!(params.flag("full"), Some(true));
        assert_eq!(params.int("newid"), Some(123));
    }

    #[test]
    fn urlencoded_charset() {
        assert!(is_urlencoded("ssh-ed25519%20AAAA%2B%2F%3D%20me%40host"));
        assert!(!is_urlencoded("ssh-ed25519 AAAA"));
        assert!(!is_urlencoded("a+b"));
    }
}
