//! An in-process ISO 9660 writer for NoCloud seed images, with Joliet names.
//!
//! cloud-init finds a NoCloud seed by its filesystem label, `cidata` (blkid compares it ignoring
//! case), and reads `user-data`, `meta-data`, `network-config` and `vendor-data` from its root.
//! Those names are lowercase and contain `-`, which plain ISO 9660 cannot hold, so the image
//! carries two directory trees over the same file extents, as `genisoimage -J -V cidata` does:
//!
//! - the primary tree, with ISO 9660 level 2 identifiers: upper case, `_` for every character
//!   that is not a d-character, the last `.` kept as the extension separator, at most 30
//!   characters, version `;1` (`user-data` becomes `USER_DATA.;1`). Names that map to the same
//!   identifier get a number at the end of the name part (`A_B.;1`, `A_B1.;1`);
//! - the Joliet tree (Supplementary Volume Descriptor, escape sequence `%/E`, UCS-2 big-endian),
//!   with the names exactly as given and no version suffix. Linux, blkid and xorriso use it.
//!
//! Only a flat root directory is written. Every number below is a 2048-byte sector:
//!
//! | sector | contents |
//! | --- | --- |
//! | 0–15 | system area, zeros |
//! | 16 | Primary Volume Descriptor (`CD001` at byte 32769), volume id as given |
//! | 17 | Joliet Supplementary Volume Descriptor, volume id in UCS-2 |
//! | 18 | Volume Descriptor Set Terminator |
//! | 19, 20 | primary path table, L (little-endian) then M (big-endian) |
//! | 21, 22 | Joliet path table, L then M |
//! | 23… | primary root directory (`.`, `..`, then files sorted by identifier) |
//! | … | Joliet root directory, the same records with Joliet names |
//! | … | file data in the order given, each file starting on a sector boundary |
//!
//! An empty file has extent 0 (the zeroed system area) and length 0, so it uses no sector.
//! Directory records never cross a sector boundary; the rest of a sector is zero-filled.
//!
//! The output depends only on the input: every timestamp is the Unix epoch,
//! 1970-01-01T00:00:00Z (as with `SOURCE_DATE_EPOCH=0`), so golden tests stay stable. blkid
//! derives the volume UUID from that date, so every seed has the UUID `1970-01-01-00-00-00-00`;
//! cloud-init looks seeds up by label, not UUID.

use std::{cmp::Ordering, collections::HashSet, fmt};

/// The size of a logical block and of a sector.
const SECTOR: usize = 2048;
/// The sector of the Primary Volume Descriptor, after the 16 sectors of the system area.
const PRIMARY_DESCRIPTOR_SECTOR: u32 = 16;
const PRIMARY_L_PATH_TABLE_SECTOR: u32 = 19;
const PRIMARY_M_PATH_TABLE_SECTOR: u32 = 20;
const JOLIET_L_PATH_TABLE_SECTOR: u32 = 21;
const JOLIET_M_PATH_TABLE_SECTOR: u32 = 22;
/// The first sector after the descriptors and path tables: the primary root directory.
const FIRST_DIRECTORY_SECTOR: u32 = 23;

/// The longest volume id. The Joliet volume id field holds 16 UCS-2 characters, and a longer
/// label would differ between the two descriptors.
const MAX_VOLUME_ID_LEN: usize = 16;
/// The longest file name: the Joliet limit of 64 UCS-2 characters.
const MAX_FILE_NAME_LEN: usize = 64;
/// The longest primary identifier, name and extension together (ISO 9660 level 2).
const MAX_PRIMARY_NAME_LEN: usize = 30;
/// The longest extension kept in a primary identifier, so that the name part keeps room.
const MAX_PRIMARY_EXTENSION_LEN: usize = 15;

/// Written into the application id of both descriptors, so `isoinfo -d` tells who wrote it.
const APPLICATION_ID: &str = "HOMELAB NOCLOUD SEED";
/// The recording date of every directory record: 1970-01-01 00:00:00 UTC (years since 1900,
/// month, day, hour, minute, second, offset from GMT in 15-minute units).
const RECORDED_AT: [u8; 7] = [70, 1, 1, 0, 0, 0, 0];
/// The volume creation and modification dates: 1970-01-01 00:00:00.00 UTC.
const VOLUME_DATE: &[u8; 17] = b"1970010100000000\0";
/// A volume date that is "not specified": used for the expiration and effective dates.
const UNSPECIFIED_DATE: &[u8; 17] = b"0000000000000000\0";

/// Directory record flag: the record describes a directory.
const FLAG_DIRECTORY: u8 = 0x02;

/// One file of the image's root directory.
#[derive(Clone, Copy)]
pub struct IsoFile<'a> {
    /// The file name as the guest sees it (Joliet): 1 to 64 characters from `A`–`Z`, `a`–`z`,
    /// `0`–`9`, `-`, `_` and `.`, and neither `.` nor `..`.
    pub name: &'a str,
    /// The contents, at most 4 GiB − 1 bytes.
    pub data: &'a [u8],
}

impl fmt::Debug for IsoFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IsoFile")
            .field("name", &self.name)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    /// The volume id is empty, too long, or has a character other than `A`–`Z`, `a`–`z`,
    /// `0`–`9` and `_`.
    #[error("volume id {volume_id:?} is not 1 to 16 characters from A-Z, a-z, 0-9 and _")]
    InvalidVolumeId {
        /// The volume id as given.
        volume_id: String,
    },
    /// A file name is empty, too long, `.` or `..`, or has a character that is not allowed.
    #[error(
        "file name {name:?} is not 1 to 64 characters from A-Z, a-z, 0-9, '-', '_' and '.' \
         (and not . or ..)"
    )]
    InvalidFileName {
        /// The file name as given.
        name: String,
    },
    /// Two files have the same name, ignoring case (Linux looks Joliet names up ignoring case).
    #[error("file name {name:?} is given more than once (names are compared ignoring case)")]
    DuplicateFileName {
        /// The second occurrence of the name.
        name: String,
    },
    /// A file is larger than one ISO 9660 extent can hold.
    #[error("file {name:?} is {size} bytes; an ISO 9660 file holds at most 4294967295")]
    FileTooLarge {
        /// The file's name.
        name: String,
        /// The file's size in bytes.
        size: u64,
    },
    /// The whole image is larger than ISO 9660 or this machine's memory can address.
    #[error("the image would be {bytes} bytes, more than can be addressed")]
    ImageTooLarge {
        /// The size the image would have.
        bytes: u64,
    },
}

/// Builds an ISO 9660 image with Joliet names whose root directory holds `files`, labelled
/// `volume_id` (`cidata` for a NoCloud seed).
///
/// The volume id is written as given, in both descriptors (`genisoimage -V cidata` keeps the
/// lower case too). The layout is in the [module documentation](self). The same input always
/// gives the same bytes.
///
/// ```
/// use homelab::seed::iso::{IsoFile, build};
///
/// let image = build(
///     "cidata",
///     &[
///         IsoFile { name: "meta-data", data: b"instance-id: wk-1\n" },
///         IsoFile { name: "user-data", data: b"#cloud-config\n" },
///     ],
/// )?;
/// assert_eq!(&image[32769..32774], b"CD001");
/// # Ok::<(), homelab::seed::iso::IsoError>(())
/// ```
pub fn build(volume_id: &str, files: &[IsoFile<'_>]) -> Result<Vec<u8>, IsoError> {
    check_volume_id(volume_id)?;
    check_file_names(files)?;
    let sizes = files
        .iter()
        .map(|file| {
            u32::try_from(file.data.len()).map_err(|_| IsoError::FileTooLarge {
                name: file.name.to_owned(),
                size: file.data.len() as u64,
            })
        })
        .collect::<Result<Vec<u32>, _>>()?;

    // Each tree's identifiers with the index of their file, in directory order.
    let primary_ids = sorted(primary_identifiers(files), primary_order);
    let joliet_ids = sorted(
        files.iter().map(|file| ucs2(file.name)).collect(),
        <[u8]>::cmp,
    );

    // Lay out the sectors in u64, so no sum can overflow before it is checked.
    let primary_root = u64::from(FIRST_DIRECTORY_SECTOR);
    let primary_root_sectors = directory_sectors(&primary_ids);
    let joliet_root = primary_root + primary_root_sectors;
    let joliet_root_sectors = directory_sectors(&joliet_ids);
    let mut next = joliet_root + joliet_root_sectors;
    let mut extents = Vec::with_capacity(files.len());
    for &size in &sizes {
        if size == 0 {
            extents.push(0);
        } else {
            extents.push(next);
            next += u64::from(size).div_ceil(SECTOR as u64);
        }
    }
    let total_bytes = next * SECTOR as u64;
    let too_large = || IsoError::ImageTooLarge { bytes: total_bytes };
    let volume_sectors = u32::try_from(next).map_err(|_| too_large())?;
    let capacity = usize::try_from(total_bytes).map_err(|_| too_large())?;
    let directory_len =
        |sectors: u64| u32::try_from(sectors * SECTOR as u64).map_err(|_| too_large());
    let primary_root_len = directory_len(primary_root_sectors)?;
    let joliet_root_len = directory_len(joliet_root_sectors)?;
    // Every sector number is below the volume size, which fits in u32.
    let extents: Vec<u32> = extents.into_iter().map(|e| e as u32).collect();
    let make_tree = |joliet, root: u64, root_len, ids: Vec<(usize, Vec<u8>)>| Tree {
        joliet,
        root: root as u32,
        root_len,
        records: ids
            .into_iter()
            .map(|(i, id)| FileRecord {
                id,
                extent: extents[i],
                len: sizes[i],
            })
            .collect(),
    };
    let primary = make_tree(false, primary_root, primary_root_len, primary_ids);
    let joliet = make_tree(true, joliet_root, joliet_root_len, joliet_ids);

    let mut image = Vec::with_capacity(capacity);
    image.resize(PRIMARY_DESCRIPTOR_SECTOR as usize * SECTOR, 0);
    image.extend_from_slice(&volume_descriptor(volume_id, volume_sectors, &primary));
    image.extend_from_slice(&volume_descriptor(volume_id, volume_sectors, &joliet));
    image.extend_from_slice(&terminator());
    for tree in [&primary, &joliet] {
        image.extend_from_slice(&path_table(tree.root, false));
        image.extend_from_slice(&path_table(tree.root, true));
    }
    write_directory(&mut image, &primary);
    write_directory(&mut image, &joliet);
    for (file, &extent) in files.iter().zip(&extents) {
        if !file.data.is_empty() {
            debug_assert_eq!(image.len(), extent as usize * SECTOR);
            image.extend_from_slice(file.data);
            pad_to_sector(&mut image);
        }
    }
    debug_assert_eq!(image.len(), capacity);
    Ok(image)
}

fn check_volume_id(volume_id: &str) -> Result<(), IsoError> {
    let valid = (1..=MAX_VOLUME_ID_LEN).contains(&volume_id.len())
        && volume_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(IsoError::InvalidVolumeId {
            volume_id: volume_id.to_owned(),
        })
    }
}

fn check_file_names(files: &[IsoFile<'_>]) -> Result<(), IsoError> {
    let mut seen = HashSet::with_capacity(files.len());
    for file in files {
        let name = file.name;
        let valid = (1..=MAX_FILE_NAME_LEN).contains(&name.len())
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(IsoError::InvalidFileName {
                name: name.to_owned(),
            });
        }
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(IsoError::DuplicateFileName {
                name: name.to_owned(),
            });
        }
    }
    Ok(())
}

/// The primary (ISO 9660 level 2) identifier of each file, unique within the directory.
fn primary_identifiers(files: &[IsoFile<'_>]) -> Vec<Vec<u8>> {
    let mut taken = HashSet::with_capacity(files.len());
    files
        .iter()
        .map(|file| {
            let (stem, extension) = file.name.rsplit_once('.').unwrap_or((file.name, ""));
            let stem = d_characters(stem);
            let mut extension = d_characters(extension);
            extension.truncate(MAX_PRIMARY_EXTENSION_LEN);
            let mut id = primary_identifier(&stem, &extension, "");
            let mut n = 1u32;
            while !taken.insert(id.clone()) {
                id = primary_identifier(&stem, &extension, &n.to_string());
                n += 1;
            }
            id
        })
        .collect()
}

/// `STEM` cut to fit, then `suffix`, `.`, `EXTENSION` and `;1`.
fn primary_identifier(stem: &[u8], extension: &[u8], suffix: &str) -> Vec<u8> {
    let stem_len = stem
        .len()
        .min(MAX_PRIMARY_NAME_LEN - extension.len() - suffix.len());
    let mut id = Vec::with_capacity(MAX_PRIMARY_NAME_LEN + 3);
    id.extend_from_slice(&stem[..stem_len]);
    id.extend_from_slice(suffix.as_bytes());
    id.push(b'.');
    id.extend_from_slice(extension);
    id.extend_from_slice(b";1");
    id
}

/// Upper case, with `_` for every character that is not a d-character (`A`–`Z`, `0`–`9`, `_`).
fn d_characters(text: &str) -> Vec<u8> {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                b.to_ascii_uppercase()
            } else {
                b'_'
            }
        })
        .collect()
}

/// UCS-2 big-endian, as Joliet stores names. Callers pass ASCII, which UCS-2 covers.
fn ucs2(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

/// One directory tree: its root directory and path tables.
struct Tree {
    joliet: bool,
    /// The root directory's first sector.
    root: u32,
    /// The root directory's length in bytes, whole sectors.
    root_len: u32,
    /// The file records, sorted by identifier.
    records: Vec<FileRecord>,
}

struct FileRecord {
    id: Vec<u8>,
    extent: u32,
    len: u32,
}

/// Pairs each identifier with its file's index and sorts them by `order`.
fn sorted(ids: Vec<Vec<u8>>, order: fn(&[u8], &[u8]) -> Ordering) -> Vec<(usize, Vec<u8>)> {
    let mut ids: Vec<(usize, Vec<u8>)> = ids.into_iter().enumerate().collect();
    ids.sort_by(|a, b| order(&a.1, &b.1));
    ids
}

/// The order of primary directory records (ECMA-119 9.3): by name, then by extension, each
/// padded with spaces. (All identifiers have version 1.) Plain byte order differs: it puts
/// `AB.1;1` before `AB.;1`.
fn primary_order(a: &[u8], b: &[u8]) -> Ordering {
    let (a_name, a_extension) = split_identifier(a);
    let (b_name, b_extension) = split_identifier(b);
    padded_cmp(a_name, b_name).then_with(|| padded_cmp(a_extension, b_extension))
}

/// `NAME.EXT;1` as `(NAME, EXT)`.
fn split_identifier(id: &[u8]) -> (&[u8], &[u8]) {
    let id = id.strip_suffix(b";1").unwrap_or(id);
    match id.iter().position(|&b| b == b'.') {
        Some(dot) => (&id[..dot], &id[dot + 1..]),
        None => (id, &[]),
    }
}

/// Compares as if the shorter were padded with spaces to the longer's length.
fn padded_cmp(a: &[u8], b: &[u8]) -> Ordering {
    (0..a.len().max(b.len()))
        .map(|i| {
            let at = |s: &[u8]| s.get(i).copied().unwrap_or(b' ');
            at(a).cmp(&at(b))
        })
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

/// The size of a directory record with an identifier of `id_len` bytes: 33 fixed bytes, the
/// identifier, and a padding byte that keeps the record length even.
fn record_len(id_len: usize) -> usize {
    33 + id_len + (1 - id_len % 2)
}

/// Where each record of a directory starts, relative to the directory, given its identifiers
/// in order; a record that would cross a sector boundary moves to the next sector. Returns
/// the offsets and the directory's length in whole sectors.
fn record_offsets(id_lens: impl Iterator<Item = usize>) -> (Vec<usize>, u64) {
    let mut offsets = Vec::new();
    let mut end = 0;
    for id_len in id_lens {
        let len = record_len(id_len);
        if end % SECTOR + len > SECTOR {
            end = end.next_multiple_of(SECTOR);
        }
        offsets.push(end);
        end += len;
    }
    (offsets, end.div_ceil(SECTOR) as u64)
}

/// The identifier lengths of a root directory: `.` and `..` (one byte each), then the files.
fn directory_id_lens<'a>(ids: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = usize> {
    [1, 1].into_iter().chain(ids.map(<[u8]>::len))
}

/// The length in sectors of a root directory holding these identifiers, in order.
fn directory_sectors(ids: &[(usize, Vec<u8>)]) -> u64 {
    record_offsets(directory_id_lens(ids.iter().map(|(_, id)| id.as_slice()))).1
}

/// Appends the root directory of `tree`: `.`, `..`, then the files, zero-filled to its end.
fn write_directory(image: &mut Vec<u8>, tree: &Tree) {
    let start = image.len();
    let (offsets, _) = record_offsets(directory_id_lens(
        tree.records.iter().map(|r| r.id.as_slice()),
    ));
    let this = (&[0u8][..], tree.root, tree.root_len, FLAG_DIRECTORY);
    let parent = (&[1u8][..], tree.root, tree.root_len, FLAG_DIRECTORY);
    let files = tree
        .records
        .iter()
        .map(|r| (r.id.as_slice(), r.extent, r.len, 0));
    for (offset, (id, extent, len, flags)) in offsets
        .into_iter()
        .zip([this, parent].into_iter().chain(files))
    {
        image.resize(start + offset, 0);
        image.extend_from_slice(&directory_record(id, extent, len, flags));
    }
    image.resize(start + tree.root_len as usize, 0);
}

/// One directory record (ECMA-119 9.1).
fn directory_record(id: &[u8], extent: u32, len: u32, flags: u8) -> Vec<u8> {
    let mut record = vec![0; record_len(id.len())];
    // Both fit in a byte: identifiers are at most 2 × 64 bytes.
    record[0] = record.len() as u8;
    record[2..10].copy_from_slice(&both_u32(extent));
    record[10..18].copy_from_slice(&both_u32(len));
    record[18..25].copy_from_slice(&RECORDED_AT);
    record[25] = flags;
    record[28..32].copy_from_slice(&both_u16(1)); // volume sequence number
    record[32] = id.len() as u8;
    record[33..33 + id.len()].copy_from_slice(id);
    record
}

/// The Primary or (for a Joliet tree) Supplementary Volume Descriptor (ECMA-119 8.4, 8.5).
fn volume_descriptor(volume_id: &str, volume_sectors: u32, tree: &Tree) -> [u8; SECTOR] {
    let mut d = [0; SECTOR];
    d[0] = if tree.joliet { 2 } else { 1 };
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1; // descriptor version
    let text = |d: &mut [u8; SECTOR], range: std::ops::Range<usize>, value: &str| {
        text_field(&mut d[range], value, tree.joliet);
    };
    text(&mut d, 8..40, ""); // system id
    text(&mut d, 40..72, volume_id);
    d[80..88].copy_from_slice(&both_u32(volume_sectors));
    if tree.joliet {
        d[88..91].copy_from_slice(b"%/E"); // UCS-2 level 3
    }
    d[120..124].copy_from_slice(&both_u16(1)); // volume set size
    d[124..128].copy_from_slice(&both_u16(1)); // volume sequence number
    d[128..132].copy_from_slice(&both_u16(SECTOR as u16)); // logical block size
    d[132..140].copy_from_slice(&both_u32(PATH_TABLE_LEN as u32));
    let (l_path_table, m_path_table) = if tree.joliet {
        (JOLIET_L_PATH_TABLE_SECTOR, JOLIET_M_PATH_TABLE_SECTOR)
    } else {
        (PRIMARY_L_PATH_TABLE_SECTOR, PRIMARY_M_PATH_TABLE_SECTOR)
    };
    d[140..144].copy_from_slice(&l_path_table.to_le_bytes());
    d[148..152].copy_from_slice(&m_path_table.to_be_bytes());
    d[156..190].copy_from_slice(&directory_record(
        &[0],
        tree.root,
        tree.root_len,
        FLAG_DIRECTORY,
    ));
    text(&mut d, 190..318, ""); // volume set id
    text(&mut d, 318..446, ""); // publisher id
    text(&mut d, 446..574, ""); // data preparer id
    text(&mut d, 574..702, APPLICATION_ID);
    text(&mut d, 702..739, ""); // copyright file id
    text(&mut d, 739..776, ""); // abstract file id
    text(&mut d, 776..813, ""); // bibliographic file id
    d[813..830].copy_from_slice(VOLUME_DATE); // creation
    d[830..847].copy_from_slice(VOLUME_DATE); // modification
    d[847..864].copy_from_slice(UNSPECIFIED_DATE); // expiration
    d[864..881].copy_from_slice(UNSPECIFIED_DATE); // effective
    d[881] = 1; // file structure version
    d
}

/// Fills a descriptor text field with `value` padded with spaces: one byte per character, or
/// UCS-2 big-endian for Joliet. A Joliet field of odd length ends with one zero byte, as
/// genisoimage writes it. `value` is ASCII and fits (the callers check or know it).
fn text_field(field: &mut [u8], value: &str, joliet: bool) {
    if joliet {
        for pair in field.chunks_exact_mut(2) {
            pair.copy_from_slice(&[0, b' ']);
        }
        let value = ucs2(value);
        field[..value.len()].copy_from_slice(&value);
    } else {
        field.fill(b' ');
        field[..value.len()].copy_from_slice(value.as_bytes());
    }
}

/// The Volume Descriptor Set Terminator (ECMA-119 8.3).
fn terminator() -> [u8; SECTOR] {
    let mut d = [0; SECTOR];
    d[0] = 255;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d
}

/// The length of a path table holding only the root: 8 fixed bytes, the one-byte identifier
/// and a padding byte.
const PATH_TABLE_LEN: usize = 10;

/// A path table sector (ECMA-119 9.4) with the root directory as its only entry, in
/// little-endian (type L) or big-endian (type M) byte order.
fn path_table(root: u32, big_endian: bool) -> [u8; SECTOR] {
    let mut t = [0; SECTOR];
    t[0] = 1; // identifier length
    let (extent, parent) = if big_endian {
        (root.to_be_bytes(), 1u16.to_be_bytes())
    } else {
        (root.to_le_bytes(), 1u16.to_le_bytes())
    };
    t[2..6].copy_from_slice(&extent);
    t[6..8].copy_from_slice(&parent);
    // t[8] = 0: the root's identifier; t[9]: padding.
    t
}

fn pad_to_sector(image: &mut Vec<u8>) {
    image.resize(image.len().next_multiple_of(SECTOR), 0);
}

/// A 32-bit value in both byte orders, little-endian first (ECMA-119 7.3.3).
fn both_u32(value: u32) -> [u8; 8] {
    let mut out = [0; 8];
    out[..4].copy_from_slice(&value.to_le_bytes());
    out[4..].copy_from_slice(&value.to_be_bytes());
    out
}

/// A 16-bit value in both byte orders, little-endian first (ECMA-119 7.2.3).
fn both_u16(value: u16) -> [u8; 4] {
    let mut out = [0; 4];
    out[..2].copy_from_slice(&value.to_le_bytes());
    out[2..].copy_from_slice(&value.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        ffi::OsStr,
        fs,
        os::unix::fs::PermissionsExt,
        path::Path,
        process::{Command, Output},
        time::Instant,
    };

    use sha2::{Digest, Sha256};

    use super::*;

    const USER_DATA: &[u8] = b"#cloud-config\nhostname: wk-1\nfqdn: wk-1.home.internal\n";
    const META_DATA: &[u8] = b"instance-id: wk-1-0001\nlocal-hostname: wk-1\n";
    const NETWORK_CONFIG: &[u8] = b"version: 2\nethernets:\n  lan0:\n    dhcp4: true\n";

    /// Bytes that are not all alike, so a wrong offset shows up.
    fn binary(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + i / 2048) as u8).collect()
    }

    /// A seed like the coordinator's: an empty vendor-data and an agent spanning three sectors.
    fn seed_image(agent: &[u8]) -> Vec<u8> {
        build("cidata", &seed_files(agent)).unwrap()
    }

    fn seed_files(agent: &[u8]) -> Vec<IsoFile<'_>> {
        vec![
            IsoFile {
                name: "user-data",
                data: USER_DATA,
            },
            IsoFile {
                name: "meta-data",
                data: META_DATA,
            },
            IsoFile {
                name: "network-config",
                data: NETWORK_CONFIG,
            },
            IsoFile {
                name: "vendor-data",
                data: b"",
            },
            IsoFile {
                name: "homelab-agent",
                data: agent,
            },
        ]
    }

    fn expected(files: &[IsoFile<'_>]) -> BTreeMap<String, Vec<u8>> {
        files
            .iter()
            .map(|f| (f.name.to_owned(), f.data.to_vec()))
            .collect()
    }

    fn sector(image: &[u8], n: u32) -> &[u8] {
        &image[n as usize * SECTOR..][..SECTOR]
    }

    /// Reads a both-endian 32-bit field, checking that both halves agree.
    fn both32(bytes: &[u8]) -> u32 {
        let le = u32::from_le_bytes(bytes[..4].try_into().unwrap());
        let be = u32::from_be_bytes(bytes[4..8].try_into().unwrap());
        assert_eq!(le, be, "both-endian halves differ");
        le
    }

    fn both16(bytes: &[u8]) -> u16 {
        let le = u16::from_le_bytes(bytes[..2].try_into().unwrap());
        let be = u16::from_be_bytes(bytes[2..4].try_into().unwrap());
        assert_eq!(le, be, "both-endian halves differ");
        le
    }

    #[derive(Debug)]
    struct Parsed {
        id: Vec<u8>,
        extent: u32,
        len: u32,
        flags: u8,
    }

    fn parse_record(bytes: &[u8]) -> Parsed {
        let len = bytes[0] as usize;
        let id_len = bytes[32] as usize;
        assert_eq!(len, record_len(id_len), "record length");
        assert_eq!(len % 2, 0);
        assert_eq!(bytes[1], 0, "extended attribute record length");
        assert_eq!(&bytes[18..25], &RECORDED_AT);
        assert_eq!(both16(&bytes[28..32]), 1, "volume sequence number");
        Parsed {
            id: bytes[33..33 + id_len].to_vec(),
            extent: both32(&bytes[2..10]),
            len: both32(&bytes[10..18]),
            flags: bytes[25],
        }
    }

    /// Every record of a directory, checking that none crosses a sector boundary.
    fn parse_directory(image: &[u8], extent: u32, len: u32) -> Vec<Parsed> {
        assert_eq!(
            len as usize % SECTOR,
            0,
            "directory length is whole sectors"
        );
        let mut records = Vec::new();
        for n in extent..extent + len / SECTOR as u32 {
            let s = sector(image, n);
            let mut offset = 0;
            while offset < SECTOR && s[offset] != 0 {
                let record_len = s[offset] as usize;
                assert!(offset + record_len <= SECTOR, "record crosses a sector");
                records.push(parse_record(&s[offset..offset + record_len]));
                offset += record_len;
            }
            assert!(s[offset..].iter().all(|&b| b == 0), "sector tail is zero");
        }
        records
    }

    /// Follows a volume descriptor to its root directory and returns the files by name, with
    /// their records, checking `.` and `..` on the way.
    fn read_tree(image: &[u8], descriptor: u32) -> BTreeMap<String, (Parsed, Vec<u8>)> {
        let d = sector(image, descriptor);
        let joliet = d[0] == 2;
        let root = parse_record(&d[156..190]);
        assert_eq!(root.id, [0]);
        assert_eq!(root.flags, FLAG_DIRECTORY);
        let records = parse_directory(image, root.extent, root.len);
        assert_eq!(records[0].id, [0], "first record is .");
        assert_eq!(records[1].id, [1], "second record is ..");
        for dot in &records[..2] {
            assert_eq!((dot.extent, dot.len, dot.flags), (root.extent, root.len, 2));
        }
        let ids: Vec<&Vec<u8>> = records[2..].iter().map(|r| &r.id).collect();
        let order: fn(&[u8], &[u8]) -> Ordering = if joliet { <[u8]>::cmp } else { primary_order };
        assert!(
            ids.is_sorted_by(|a, b| order(a.as_slice(), b.as_slice()).is_le()),
            "records are sorted"
        );
        records
            .into_iter()
            .skip(2)
            .map(|record| {
                assert_eq!(record.flags, 0);
                let name = if joliet {
                    let units: Vec<u16> = record
                        .id
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect();
                    String::from_utf16(&units).unwrap()
                } else {
                    String::from_utf8(record.id.clone()).unwrap()
                };
                let start = record.extent as usize * SECTOR;
                let data = image[start..start + record.len as usize].to_vec();
                (name, (record, data))
            })
            .collect()
    }

    fn contents(tree: BTreeMap<String, (Parsed, Vec<u8>)>) -> BTreeMap<String, Vec<u8>> {
        tree.into_iter()
            .map(|(name, (_, data))| (name, data))
            .collect()
    }

    #[test]
    fn descriptors_sit_at_sectors_16_to_18_with_cd001_at_byte_32769() {
        let image = seed_image(&binary(5000));
        assert_eq!(image.len() % SECTOR, 0);
        assert!(image[..16 * SECTOR].iter().all(|&b| b == 0), "system area");
        assert_eq!(&image[32769..32774], b"CD001");
        for (n, kind) in [(16, 1), (17, 2), (18, 255)] {
            let d = sector(&image, n);
            assert_eq!(
                (d[0], &d[1..6], d[6]),
                (kind, &b"CD001"[..], 1),
                "sector {n}"
            );
        }
        assert!(sector(&image, 18)[7..].iter().all(|&b| b == 0));
        for n in [16, 17] {
            let d = sector(&image, n);
            assert_eq!(
                both32(&d[80..88]) as usize,
                image.len() / SECTOR,
                "volume space"
            );
            assert_eq!(both16(&d[120..124]), 1, "volume set size");
            assert_eq!(both16(&d[124..128]), 1, "volume sequence number");
            assert_eq!(both16(&d[128..132]), 2048, "logical block size");
            assert_eq!(&d[813..830], b"1970010100000000\0", "creation date");
            assert_eq!(&d[830..847], b"1970010100000000\0", "modification date");
            assert_eq!(d[881], 1, "file structure version");
        }
        assert_eq!(
            &sector(&image, 16)[88..91],
            [0, 0, 0],
            "no escape in the PVD"
        );
        assert_eq!(&sector(&image, 17)[88..91], b"%/E", "Joliet UCS-2 level 3");
    }

    #[test]
    fn volume_id_is_written_as_given_in_both_descriptors() {
        let image = seed_image(b"agent");
        let primary = &sector(&image, 16)[40..72];
        assert_eq!(primary, format!("{:<32}", "cidata").as_bytes());
        let joliet = &sector(&image, 17)[40..72];
        assert_eq!(joliet, ucs2(&format!("{:<16}", "cidata")));
        let upper = build("CIDATA", &[]).unwrap();
        assert_eq!(&sector(&upper, 16)[40..46], b"CIDATA");
    }

    #[test]
    fn joliet_tree_holds_the_exact_names_and_contents() {
        let agent = binary(5000);
        let image = seed_image(&agent);
        let tree = contents(read_tree(&image, 17));
        assert_eq!(tree, expected(&seed_files(&agent)));
    }

    #[test]
    fn primary_tree_holds_level_2_names_over_the_same_extents() {
        let agent = binary(5000);
        let image = seed_image(&agent);
        let primary = read_tree(&image, 16);
        let names: Vec<&str> = primary.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "HOMELAB_AGENT.;1",
                "META_DATA.;1",
                "NETWORK_CONFIG.;1",
                "USER_DATA.;1",
                "VENDOR_DATA.;1"
            ]
        );
        let joliet = read_tree(&image, 17);
        for (name, (record, _)) in &joliet {
            let primary_name = format!("{}.;1", name.to_uppercase().replace('-', "_"));
            let (primary_record, _) = &primary[&primary_name];
            assert_eq!(
                (primary_record.extent, primary_record.len),
                (record.extent, record.len)
            );
        }
    }

    #[test]
    fn path_tables_list_each_root_in_both_byte_orders() {
        let image = seed_image(b"agent");
        for n in [16, 17] {
            let d = sector(&image, n);
            let root = parse_record(&d[156..190]).extent;
            assert_eq!(both32(&d[132..140]), 10, "path table size");
            let l = u32::from_le_bytes(d[140..144].try_into().unwrap());
            let m = u32::from_be_bytes(d[148..152].try_into().unwrap());
            assert_eq!((&d[144..148], &d[152..156]), (&[0; 4][..], &[0; 4][..]));
            let mut entry = vec![1, 0];
            entry.extend_from_slice(&root.to_le_bytes());
            entry.extend_from_slice(&[1, 0, 0, 0]);
            assert_eq!(&sector(&image, l)[..10], entry, "L table of sector {n}");
            let mut entry = vec![1, 0];
            entry.extend_from_slice(&root.to_be_bytes());
            entry.extend_from_slice(&[0, 1, 0, 0]);
            assert_eq!(&sector(&image, m)[..10], entry, "M table of sector {n}");
        }
    }

    #[test]
    fn file_extents_are_sector_aligned_zero_padded_and_disjoint() {
        let agent = binary(5000);
        let image = seed_image(&agent);
        let joliet = read_tree(&image, 17);
        let root = parse_record(&sector(&image, 17)[156..190]);
        let mut used: Vec<(u32, u32)> = Vec::new();
        for (name, (record, _)) in &joliet {
            if record.len == 0 {
                assert_eq!(record.extent, 0, "{name}: an empty file takes no sector");
                continue;
            }
            let sectors = record.len.div_ceil(SECTOR as u32);
            assert!(
                record.extent >= root.extent + root.len / SECTOR as u32,
                "{name}"
            );
            let end = (record.extent + sectors) as usize * SECTOR;
            let start = record.extent as usize * SECTOR;
            assert!(
                image[start + record.len as usize..end]
                    .iter()
                    .all(|&b| b == 0),
                "{name}: padding"
            );
            used.push((record.extent, record.extent + sectors));
        }
        used.sort();
        assert!(
            used.windows(2).all(|w| w[0].1 <= w[1].0),
            "overlap: {used:?}"
        );
        assert_eq!(used.last().unwrap().1 as usize * SECTOR, image.len());
    }

    #[test]
    fn output_is_deterministic_and_matches_the_golden_hash() {
        let agent = binary(5000);
        let image = seed_image(&agent);
        assert_eq!(image, seed_image(&agent));
        // A deliberate layout change updates this hash; check the image with the tool test
        // (isoinfo, xorriso, blkid) before accepting the new value.
        assert_eq!(
            hex::encode(Sha256::digest(&image)),
            "535a286a81554e35ed644a54f4780e4e8ecc15d1c2333869022614cec47324de",
            "image bytes changed"
        );
    }

    #[test]
    fn names_that_map_alike_get_unique_primary_identifiers() {
        let files = [
            IsoFile {
                name: "a-b",
                data: b"1",
            },
            IsoFile {
                name: "a_b",
                data: b"2",
            },
            IsoFile {
                name: "a_b1",
                data: b"3",
            },
            IsoFile {
                name: "a.b",
                data: b"4",
            },
            IsoFile {
                name: ".hidden",
                data: b"5",
            },
        ];
        let image = build("cidata", &files).unwrap();
        let primary = contents(read_tree(&image, 16));
        let names: Vec<&str> = primary.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [".HIDDEN;1", "A.B;1", "A_B.;1", "A_B1.;1", "A_B11.;1"]
        );
        assert_eq!(contents(read_tree(&image, 17)), expected(&files));
    }

    #[test]
    fn primary_records_sort_by_padded_name_then_extension() {
        let files = [
            IsoFile {
                name: "ab.1",
                data: b"",
            },
            IsoFile {
                name: "ab",
                data: b"",
            },
            IsoFile {
                name: "a",
                data: b"",
            },
            IsoFile {
                name: "ab.a",
                data: b"",
            },
        ];
        let image = build("cidata", &files).unwrap();
        let root = parse_record(&sector(&image, 16)[156..190]);
        let ids: Vec<Vec<u8>> = parse_directory(&image, root.extent, root.len)
            .into_iter()
            .skip(2)
            .map(|r| r.id)
            .collect();
        let expected: [&[u8]; 4] = [b"A.;1", b"AB.;1", b"AB.1;1", b"AB.A;1"];
        assert_eq!(ids, expected);
    }

    #[test]
    fn long_names_are_cut_to_30_characters_in_the_primary_tree() {
        let one = format!("{}-one.conf", "x".repeat(50));
        let two = format!("{}-two.conf", "x".repeat(50));
        let files = [
            IsoFile {
                name: &one,
                data: b"1",
            },
            IsoFile {
                name: &two,
                data: b"2",
            },
        ];
        let image = build("cidata", &files).unwrap();
        let primary = contents(read_tree(&image, 16));
        let stem = "X".repeat(26);
        let names: Vec<&str> = primary.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [format!("{}1.CONF;1", &stem[..25]), format!("{stem}.CONF;1")]
        );
        assert_eq!(contents(read_tree(&image, 17)), expected(&files));
    }

    #[test]
    fn large_directories_span_sectors_without_splitting_records() {
        let names: Vec<String> = (0..300).map(|i| format!("file-{i:03}.yaml")).collect();
        let files: Vec<IsoFile<'_>> = names
            .iter()
            .map(|name| IsoFile {
                name,
                data: name.as_bytes(),
            })
            .collect();
        let image = build("cidata", &files).unwrap();
        for n in [16, 17] {
            let root = parse_record(&sector(&image, n)[156..190]);
            assert!(
                root.len as usize > 2 * SECTOR,
                "the test needs a multi-sector root"
            );
        }
        assert_eq!(contents(read_tree(&image, 17)), expected(&files));
        assert_eq!(read_tree(&image, 16).len(), files.len());
    }

    #[test]
    fn an_image_without_files_is_valid() {
        let image = build("cidata", &[]).unwrap();
        assert_eq!(
            image.len(),
            25 * SECTOR,
            "descriptors, path tables, two roots"
        );
        assert!(read_tree(&image, 16).is_empty());
        assert!(read_tree(&image, 17).is_empty());
    }

    #[test]
    fn invalid_volume_ids_are_rejected() {
        for volume_id in [
            "",
            "ci data",
            "ci-data",
            "cidata!",
            "cïdata",
            &"x".repeat(17),
        ] {
            match build(volume_id, &[]) {
                Err(IsoError::InvalidVolumeId { volume_id: v }) => assert_eq!(v, volume_id),
                other => panic!("{volume_id:?}: {other:?}"),
            }
        }
        assert!(build(&"X".repeat(16), &[]).is_ok());
    }

    #[test]
    fn invalid_file_names_are_rejected() {
        let long = "x".repeat(65);
        for name in [
            "", ".", "..", "a/b", "a b", "a;1", "a*", "dätä", "a\\b", &long,
        ] {
            let files = [IsoFile { name, data: b"" }];
            match build("cidata", &files) {
                Err(IsoError::InvalidFileName { name: n }) => assert_eq!(n, name),
                other => panic!("{name:?}: {other:?}"),
            }
        }
        let longest = "x".repeat(64);
        assert!(
            build(
                "cidata",
                &[IsoFile {
                    name: &longest,
                    data: b""
                }]
            )
            .is_ok()
        );
    }

    #[test]
    fn duplicate_names_are_rejected_ignoring_case() {
        for second in ["user-data", "User-Data"] {
            let files = [
                IsoFile {
                    name: "user-data",
                    data: b"1",
                },
                IsoFile {
                    name: "meta-data",
                    data: b"2",
                },
                IsoFile {
                    name: second,
                    data: b"3",
                },
            ];
            match build("cidata", &files) {
                Err(IsoError::DuplicateFileName { name }) => assert_eq!(name, second),
                other => panic!("{second:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn files_of_4_gib_are_rejected() {
        // A zeroed allocation is mapped lazily: this does not touch 4 GiB of memory.
        let huge = vec![0u8; u32::MAX as usize + 1];
        let files = [IsoFile {
            name: "homelab-agent",
            data: &huge,
        }];
        match build("cidata", &files) {
            Err(IsoError::FileTooLarge { name, size }) => {
                assert_eq!((name.as_str(), size), ("homelab-agent", 1 << 32));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_offending_value_and_debug_hides_contents() {
        let err = build("ci data", &[]).unwrap_err();
        assert!(err.to_string().contains("\"ci data\""), "{err}");
        let files = [IsoFile {
            name: "a/b",
            data: b"",
        }];
        let err = build("cidata", &files).unwrap_err();
        assert!(err.to_string().contains("\"a/b\""), "{err}");
        let file = IsoFile {
            name: "user-data",
            data: b"secret",
        };
        assert_eq!(
            format!("{file:?}"),
            r#"IsoFile { name: "user-data", len: 6 }"#
        );
    }

    #[test]
    fn a_20_mib_agent_round_trips() {
        let agent = binary(20 << 20);
        let files = seed_files(&agent);
        let started = Instant::now();
        let image = build("cidata", &files).unwrap();
        let elapsed = started.elapsed();
        println!(
            "built a {} byte seed with a 20 MiB agent in {elapsed:?}",
            image.len()
        );
        assert_eq!(
            image.len(),
            image.capacity(),
            "one allocation of the exact size"
        );
        assert_eq!(contents(read_tree(&image, 17)), expected(&files));
    }

    /// Runs an external tool, failing with how to install it when it is missing.
    fn run(tool: &str, package: &str, args: &[&OsStr]) -> Output {
        let output = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot run {tool} ({err}); run scripts/setup, which installs the Debian \
                 package {package}"
                )
            });
        assert!(
            output.status.success(),
            "{tool} {args:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn stdout(output: &Output) -> &str {
        std::str::from_utf8(&output.stdout).unwrap()
    }

    fn isoinfo(image: &Path, args: &[&str]) -> Output {
        let mut all = vec![OsStr::new("-i"), image.as_os_str()];
        all.extend(args.iter().map(OsStr::new));
        run("isoinfo", "genisoimage", &all)
    }

    #[test]
    fn isoinfo_xorriso_and_blkid_read_the_seed() {
        let agent = binary(5000);
        let files = seed_files(&agent);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.iso");
        fs::write(&path, build("cidata", &files).unwrap()).unwrap();

        let info = isoinfo(&path, &["-d"]);
        let info = stdout(&info);
        for line in [
            "Volume id: cidata",
            "Logical block size is: 2048",
            "Joliet with UCS level 3 found",
        ] {
            assert!(
                info.lines().any(|l| l == line),
                "{line:?} missing from:\n{info}"
            );
        }

        let listing = isoinfo(&path, &["-J", "-f"]);
        let mut listed: Vec<&str> = stdout(&listing).lines().collect();
        listed.sort_unstable();
        let mut names: Vec<String> = files.iter().map(|f| format!("/{}", f.name)).collect();
        names.sort_unstable();
        assert_eq!(listed, names);
        for file in &files {
            let extracted = isoinfo(&path, &["-J", "-x", &format!("/{}", file.name)]);
            assert_eq!(extracted.stdout, file.data, "isoinfo -x /{}", file.name);
        }
        let primary = isoinfo(&path, &["-f"]);
        assert!(stdout(&primary).lines().any(|l| l == "/USER_DATA.;1"));

        let out = dir.path().join("out");
        let args = [
            OsStr::new("-indev"),
            path.as_os_str(),
            OsStr::new("-osirrox"),
            OsStr::new("on"),
            OsStr::new("-extract"),
            OsStr::new("/"),
            out.as_os_str(),
        ];
        run("xorriso", "xorriso", &args);
        // xorriso gives the extracted directory the image's read-only mode (no Rock Ridge:
        // 0555); make it writable again so that the temporary directory can be removed.
        fs::set_permissions(&out, fs::Permissions::from_mode(0o755)).unwrap();
        let mut extracted = BTreeMap::new();
        for entry in fs::read_dir(&out).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            extracted.insert(name, fs::read(entry.path()).unwrap());
        }
        assert_eq!(extracted, expected(&files));

        let probe = run(
            "blkid",
            "util-linux",
            &[
                OsStr::new("-p"),
                OsStr::new("-o"),
                OsStr::new("export"),
                path.as_os_str(),
            ],
        );
        let probe = stdout(&probe);
        for line in ["LABEL=cidata", "TYPE=iso9660"] {
            assert!(
                probe.lines().any(|l| l == line),
                "{line:?} missing from:\n{probe}"
            );
        }
    }
}
