//! A small `multipart/form-data` parser with pveproxy's upload rules.
//!
//! Parts are text fields, except the one file part, which must be named `filename` and carry a
//! `filename="…"` attribute; its attribute becomes the `filename` parameter. Anything else
//! (no boundary, a file part under another name, a missing closing boundary) fails the upload.

/// Why an upload body was rejected (pveproxy answers 501 `upload failed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MultipartError {
    /// The body does not start with the boundary.
    #[error("multipart body does not start with the boundary")]
    NoOpeningBoundary,
    /// A part's headers never end.
    #[error("multipart part headers are not terminated")]
    UnterminatedHeaders,
    /// A part without `Content-Disposition: form-data; name=…`.
    #[error("wrong content disposition in multipart")]
    BadDisposition,
    /// A file part under a name other than `filename`.
    #[error("wrong field name for file upload: {0}")]
    WrongFileField(String),
    /// The closing boundary is missing.
    #[error("multipart body is not terminated")]
    Unterminated,
    /// No file part at all.
    #[error("multipart body has no file part")]
    NoFile,
}

/// A parsed upload body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upload {
    /// Text fields, in order.
    pub(crate) fields: Vec<(String, String)>,
    /// The `filename="…"` attribute of the file part.
    pub(crate) filename: String,
    /// The file content.
    pub(crate) data: Vec<u8>,
}

/// The boundary of a `multipart/form-data` content type, if it is one.
pub(crate) fn boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split([';', ',']).map(str::trim);
    let kind = parts.next()?;
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
            .filter(|b| !b.is_empty())
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses `body` with `boundary`.
pub(crate) fn parse(body: &[u8], boundary: &str) -> Result<Upload, MultipartError> {
    let opening = format!("--{boundary}");
    let delimiter = format!("\r\n--{boundary}");
    let start = find(body, opening.as_bytes()).ok_or(MultipartError::NoOpeningBoundary)?;
    let mut rest = &body[start + opening.len()..];
    let mut fields = Vec::new();
    let mut file = None;
    loop {
        if rest.starts_with(b"--") {
            break;
        }
        rest = rest.strip_prefix(b"\r\n").unwrap_or(rest);
        let header_end = find(rest, b"\r\n\r\n").ok_or(MultipartError::UnterminatedHeaders)?;
        let headers = String::from_utf8_lossy(&rest[..header_end]).into_owned();
        let content = &rest[header_end + 4..];
        let end = find(content, delimiter.as_bytes()).ok_or(MultipartError::Unterminated)?;
        let value = &content[..end];
        rest = &content[end + delimiter.len()..];

        let (name, filename) = disposition(&headers).ok_or(MultipartError::BadDisposition)?;
        match filename {
            Some(filename) if name == "filename" => file = Some((filename, value.to_vec())),
            Some(_) => return Err(MultipartError::WrongFileField(name)),
            None => fields.push((name, String::from_utf8_lossy(value).into_owned())),
        }
    }
    let (filename, data) = file.ok_or(MultipartError::NoFile)?;
    Ok(Upload {
        fields,
        filename,
        data,
    })
}

/// `(name, filename)` from a part's `Content-Disposition: form-data` header.
fn disposition(headers: &str) -> Option<(String, Option<String>)> {
    let line = headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(v.trim())
    })?;
    let mut parts = line.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("form-data") {
        return None;
    }
    let mut name = None;
    let mut filename = None;
    for part in parts {
        let Some((k, v)) = part.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim() {
            "name" => name = Some(v),
            "filename" => filename = Some(v),
            _ => {}
        }
    }
    Some((name?, filename))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, filename, data) in parts {
            out.extend_from_slice(b"--XyZ\r\n");
            match filename {
                Some(f) => out.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                None => out.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--XyZ--\r\n");
        out
    }

    #[test]
    fn fields_then_file() {
        let raw = body(&[
            ("content", None, b"iso"),
            ("filename", Some("seed-1.iso"), b"\r\nbinary\r\n--not-it"),
        ]);
        let upload = parse(&raw, "XyZ").unwrap();
        assert_eq!(upload.fields, vec![("content".into(), "iso".into())]);
        assert_eq!(upload.filename, "seed-1.iso");
        assert_eq!(upload.data, b"\r\nbinary\r\n--not-it");
    }

    #[test]
    fn file_under_another_name_fails() {
        let raw = body(&[("file", Some("a.iso"), b"x")]);
        assert_eq!(
            parse(&raw, "XyZ").unwrap_err(),
            MultipartError::WrongFileField("file".into())
        );
    }

    #[test]
    fn boundary_from_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=\"abc\"").as_deref(),
            Some("abc")
        );
        assert_eq!(boundary("application/json"), None);
        assert_eq!(boundary("multipart/form-data"), None);
    }
}
