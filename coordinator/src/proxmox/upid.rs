//! Proxmox task ids (UPIDs): `UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:`.

use std::{fmt, str::FromStr};

/// A parsed UPID. The original text is kept, because the server wants it back verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upid {
    text: String,
    /// The node the task runs on; task calls must go to this node.
    pub node: String,
    /// The task type, for example `qmclone`.
    pub kind: String,
    /// The object id, for example the source VMID of a clone; may be empty.
    pub id: String,
    /// `user@realm` or `user@realm!tokenid`.
    pub user: String,
}

/// A string that is not a UPID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a Proxmox task id (UPID)")]
pub struct UpidParseError(pub String);

impl FromStr for Upid {
    type Err = UpidParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || UpidParseError(text.to_owned());
        let body = text
            .strip_prefix("UPID:")
            .and_then(|b| b.strip_suffix(':'))
            .ok_or_else(err)?;
        let parts: Vec<&str> = body.split(':').collect();
        let [node, pid, pstart, starttime, kind, id, user] = parts[..] else {
            return Err(err());
        };
        let hex = |s: &str, lens: &[usize]| {
            lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
        };
        let node_ok = !node.is_empty()
            && node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !node.starts_with('-')
            && !node.ends_with('-');
        let no_space = |s: &str| !s.contains(|c: char| c.is_whitespace() || c == '/');
        if !node_ok
            || !hex(pid, &[8])
            || !hex(pstart, &[8, 9])
            || !hex(starttime, &[8])
            || kind.is_empty()
            || !no_space(kind)
            || !no_space(id)
            || user.is_empty()
            || !no_space(user)
        {
            return Err(err());
        }
        Ok(Self {
            text: text.to_owned(),
            node: node.to_owned(),
            kind: kind.to_owned(),
            id: id.to_owned(),
            user: user.to_owned(),
        })
    }
}

impl Upid {
    /// The UPID as the server wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_upids() {
        let upid: Upid = "UPID:pve1:0003A1F2:01B2C3D4:66F0A1B2:qmclone:9000:coord@pve!prov:"
            .parse()
            .unwrap();
        assert_eq!(upid.node, "pve1");
        assert_eq!(upid.kind, "qmclone");
        assert_eq!(upid.id, "9000");
        assert_eq!(upid.user, "coord@pve!prov");
        let upload: Upid = "UPID:pve1:0003A2B1:101B2C5E0:66F0A1B4:imgcopy::root@pam:"
            .parse()
            .unwrap();
        assert_eq!(upload.id, "");
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "UPID:pve1:0003A1F2:01B2C3D4:66F0A1B2:qmclone:9000:coord@pve!prov",
            "UPID:pve1:XYZ:01B2C3D4:66F0A1B2:qmclone:9000:root@pam:",
            "UPID:-pve:0003A1F2:01B2C3D4:66F0A1B2:qmclone:9000:root@pam:",
            "UPID:pve1:0003A1F2:01B2C3D4:66F0A1B2::9000:root@pam:",
        ] {
            assert!(bad.parse::<Upid>().is_err(), "{bad:?} accepted");
        }
    }
}
