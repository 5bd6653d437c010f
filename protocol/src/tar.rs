//! The canonical tar subset bundles are stored in.
//!
//! A bundle is a POSIX ustar archive that standard `tar` lists and extracts, but modelfleet
//! writes and accepts exactly one form of it: regular files with plain names, mode 0644, uid/gid 0,
//! mtime 0, no owner names, no prefix, and the archive ends with exactly two zero blocks and then
//! the end of the file. The reader rebuilds the header it would have written for each entry's name
//! and size and refuses any other bytes, so every byte of a bundle is either signed content or
//! fixed framing: a change anywhere is detected.

use std::io::{self, Read, Write};

pub const BLOCK: usize = 512;

/// Why an entry name is refused: a name must be a plain file name.
pub fn check_entry_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() >= 100 {
        return Err("name longer than 99 bytes");
    }
    if name == "." || name == ".." {
        return Err("name is a directory reference");
    }
    if name.contains('/') || name.contains('\\') {
        return Err("name is a path, not a plain file name");
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("name has characters other than printable ASCII");
    }
    Ok(())
}

/// The header modelfleet writes for a file `name` of `size` bytes.
pub fn header(name: &str, size: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

/// Writes `value` as zero-padded octal followed by NUL, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    assert!(
        s.len() == digits,
        "value {value} does not fit a {digits}-digit tar field"
    );
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

/// Largest file size the 11-digit octal size field holds.
pub const MAX_ENTRY_SIZE: u64 = 0o77777777777;

pub fn padding(size: u64) -> usize {
    (BLOCK - (size % BLOCK as u64) as usize) % BLOCK
}

/// Writes one entry: header, data, zero padding.
pub fn write_entry(out: &mut impl Write, name: &str, data: &[u8]) -> io::Result<()> {
    out.write_all(&header(name, data.len() as u64))?;
    out.write_all(data)?;
    out.write_all(&[0u8; BLOCK][..padding(data.len() as u64)])
}

pub fn write_end(out: &mut impl Write) -> io::Result<()> {
    out.write_all(&[0u8; 2 * BLOCK])
}

/// What the reader found where it expected a header.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Entry { name: String, size: u64 },
    End,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarError {
    #[error("the file ends inside {0}")]
    Truncated(&'static str),
    #[error("entry {index}: {reason}")]
    BadHeader { index: usize, reason: String },
    #[error("entry {index} ('{name}'): {reason}")]
    BadName {
        index: usize,
        name: String,
        reason: &'static str,
    },
    #[error("entry {index} ('{name}') is not a regular file")]
    NotPlainFile { index: usize, name: String },
    #[error("{0} byte(s) of data after the end of the archive")]
    TrailingData(u64),
    #[error("non-zero bytes in the padding after '{0}'")]
    BadPadding(String),
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before any byte was read.
fn read_block(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<bool, io::Error> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, what)),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn truncated(e: io::Error, what: &'static str) -> ReadError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadError::Tar(TarError::Truncated(what))
    } else {
        ReadError::Io(e)
    }
}

#[derive(Debug)]
pub enum ReadError {
    Io(io::Error),
    Tar(TarError),
}

/// Reads the next header (entry `index`, counting from 0) and validates it is canonical.
pub fn read_header(r: &mut impl Read, index: usize) -> Result<Next, ReadError> {
    let mut h = [0u8; BLOCK];
    match read_block(r, &mut h, "an entry header") {
        Ok(true) => {}
        Ok(false) => {
            return Err(ReadError::Tar(TarError::Truncated(
                "the archive (no end marker)",
            )))
        }
        Err(e) => return Err(truncated(e, "an entry header")),
    }
    if h.iter().all(|&b| b == 0) {
        let mut second = [0u8; BLOCK];
        match read_block(r, &mut second, "the end-of-archive marker") {
            Ok(true) if second.iter().all(|&b| b == 0) => {}
            Ok(true) => {
                return Err(ReadError::Tar(TarError::BadHeader {
                    index,
                    reason: "malformed end-of-archive marker".into(),
                }))
            }
            Ok(false) => {
                return Err(ReadError::Tar(TarError::Truncated(
                    "the end-of-archive marker",
                )))
            }
            Err(e) => return Err(truncated(e, "the end-of-archive marker")),
        }
        let mut rest = [0u8; 4096];
        let mut extra = 0u64;
        loop {
            match r.read(&mut rest) {
                Ok(0) => break,
                Ok(n) => extra += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        if extra > 0 {
            return Err(ReadError::Tar(TarError::TrailingData(extra)));
        }
        return Ok(Next::End);
    }
    let name_len = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
    let name = String::from_utf8_lossy(&h[..name_len]).into_owned();
    if h[156] != b'0' && h[156] != 0 {
        return Err(ReadError::Tar(TarError::NotPlainFile { index, name }));
    }
    if h[345] != 0 {
        return Err(ReadError::Tar(TarError::BadName {
            index,
            name,
            reason: "name is a path, not a plain file name",
        }));
    }
    if let Err(reason) = check_entry_name(&name) {
        return Err(ReadError::Tar(TarError::BadName {
            index,
            name,
            reason,
        }));
    }
    let size_field = std::str::from_utf8(&h[124..135]).ok();
    let size = size_field
        .and_then(|s| u64::from_str_radix(s, 8).ok())
        .ok_or_else(|| {
            ReadError::Tar(TarError::BadHeader {
                index,
                reason: "size field is not octal".into(),
            })
        })?;
    if header(&name, size) != h {
        return Err(ReadError::Tar(TarError::BadHeader {
            index,
            reason: format!("header of '{name}' is not in modelfleet's canonical form"),
        }));
    }
    Ok(Next::Entry { name, size })
}

/// Reads and checks the zero padding after an entry of `size` bytes.
pub fn read_padding(r: &mut impl Read, name: &str, size: u64) -> Result<(), ReadError> {
    let mut pad = [0u8; BLOCK];
    let pad = &mut pad[..padding(size)];
    match read_block(r, pad, "entry padding") {
        Ok(_) if pad.is_empty() => Ok(()),
        Ok(true) if pad.iter().all(|&b| b == 0) => Ok(()),
        Ok(true) => Err(ReadError::Tar(TarError::BadPadding(name.to_string()))),
        Ok(false) => Err(ReadError::Tar(TarError::Truncated("entry padding"))),
        Err(e) => Err(truncated(e, "entry padding")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_it_reads_and_nothing_else() {
        let mut buf = Vec::new();
        write_entry(&mut buf, "a.txt", b"hello").unwrap();
        write_end(&mut buf).unwrap();
        assert_eq!(buf.len(), 4 * BLOCK);
        let mut r = &buf[..];
        assert_eq!(
            read_header(&mut r, 0).unwrap(),
            Next::Entry {
                name: "a.txt".into(),
                size: 5
            }
        );
        let mut data = [0u8; 5];
        r.read_exact(&mut data).unwrap();
        read_padding(&mut r, "a.txt", 5).unwrap();
        assert_eq!(read_header(&mut r, 1).unwrap(), Next::End);
    }

    #[test]
    fn standard_tar_can_list_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tar");
        let mut buf = Vec::new();
        write_entry(&mut buf, "manifest.json", b"{}").unwrap();
        write_end(&mut buf).unwrap();
        std::fs::write(&path, buf).unwrap();
        let out = std::process::Command::new("tar")
            .arg("tf")
            .arg(&path)
            .output();
        if let Ok(out) = out {
            assert!(out.status.success());
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "manifest.json");
        }
    }

    #[test]
    fn refuses_bad_names() {
        for bad in ["", "..", ".", "a/b", "/x", "../x", "a\\b", "sp ace"] {
            assert!(check_entry_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_entry_name("model.onnx.zst").is_ok());
    }
}
