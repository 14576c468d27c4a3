//! Lenient decoding of Proxmox values: booleans as `0`/`1`, `"0"`/`"1"` or `true`/`false`;
//! integers as numbers or strings; floats where integers are documented.

use serde::{Deserialize, Deserializer, de::Error as _};
use serde_json::Value;

/// A boolean in any of the forms Proxmox sends.
pub fn bool_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Bool(b) => Ok(b),
        Value::Number(n) => Ok(n.as_f64().is_some_and(|v| v != 0.0)),
        Value::String(s) => match s.as_str() {
            "1" | "true" | "on" | "yes" => Ok(true),
            "0" | "false" | "off" | "no" | "" => Ok(false),
            other => Err(D::Error::custom(format!("{other:?} is not a boolean"))),
        },
        Value::Null => Ok(false),
        other => Err(D::Error::custom(format!("{other} is not a boolean"))),
    }
}

/// An optional boolean in any of the forms Proxmox sends.
pub fn opt_bool_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    bool_lenient(d).map(Some)
}

/// An unsigned integer sent as a number, a float or a string.
pub fn u64_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    value_to_u64(&Value::deserialize(d)?).map_err(D::Error::custom)
}

/// An optional unsigned integer sent as a number, a float or a string.
pub fn opt_u64_lenient<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => value_to_u64(&v).map(Some).map_err(D::Error::custom),
    }
}

/// Reads an unsigned integer out of a JSON value, leniently.
pub fn value_to_u64(v: &Value) -> Result<u64, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .ok_or_else(|| format!("{n} is not an unsigned integer")),
        Value::String(s) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("{s:?} is not an unsigned integer")),
        other => Err(format!("{other} is not an unsigned integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        #[serde(deserialize_with = "bool_lenient")]
        b: bool,
        #[serde(deserialize_with = "u64_lenient")]
        n: u64,
    }

    #[test]
    fn accepts_every_form_proxmox_sends() {
        for (json, b, n) in [
            (r#"{"b":1,"n":"100"}"#, true, 100),
            (r#"{"b":"0","n":100}"#, false, 100),
            (r#"{"b":true,"n":2.0}"#, true, 2),
        ] {
            let t: T = serde_json::from_str(json).unwrap();
            assert_eq!((t.b, t.n), (b, n), "{json}");
        }
        assert!(serde_json::from_str::<T>(r#"{"b":"maybe","n":1}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"b":1,"n":"x"}"#).is_err());
    }
}
