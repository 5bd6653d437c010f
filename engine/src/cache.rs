//! Loading the decluttered model: from the ONNX file, or from a cache of it in NNEF form.
//!
//! Parsing ONNX, typing and decluttering the graph is deterministic work that depends only on
//! the file's bytes and the tract version. With [`EngineOptions::cache_dir`] set, its result is
//! written as an NNEF archive named by the sha256 of the ONNX bytes (plus tract and cache format
//! versions) and read back on later loads. The cache is an optimisation only: a missing,
//! unreadable or unwritable cache entry falls back to the ONNX file, never to an error.
//!
//! Measured on the reference models (BENCHMARKS.md), a cache hit is *slower* than parsing the
//! ONNX file (digits: ~14 ms vs ~3 ms; mobilenetish: ~260 ms vs ~180 ms): load time is dominated
//! by building the two optimised plans, which the cache cannot skip, and reading NNEF costs more
//! than reading these small ONNX files. It is kept, off by default, for large graphs whose
//! declutter phase is expensive; leave `cache_dir` at `None` unless a measurement says otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

use crate::error::EngineError;
use crate::model::EngineOptions;
use crate::spec::{names_of, IoNames as Names};

/// Bump when what is cached, or how, changes.
const CACHE_FORMAT: &str = "modelfleet-engine-nnef-1";
const TRACT_VERSION: &str = "tract-0.23.9";

/// The typed, decluttered model with its input/output names, and whether it came from cache.
pub(crate) fn load_decluttered(
    path: &Path,
    opts: &EngineOptions,
) -> Result<(TypedModel, Names, bool), EngineError> {
    let Some(dir) = &opts.cache_dir else {
        let (model, names) = from_onnx(path)?;
        return Ok((model, names, false));
    };
    let bytes = std::fs::read(path).map_err(|e| EngineError::Load {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let entry = entry_for(dir, &bytes);
    if let Some((model, names)) = read_entry(&entry) {
        return Ok((model, names, true));
    }
    let (model, names) = from_onnx_bytes(path, &bytes)?;
    // Best effort: a failure to cache costs the next load time, nothing else.
    let _ = write_entry(&entry, &model, &names);
    Ok((model, names, false))
}

/// Cache files for one model: `<key>.nnef.tar` and `<key>.names`.
struct Entry {
    tar: PathBuf,
    names: PathBuf,
}

fn entry_for(dir: &Path, onnx: &[u8]) -> Entry {
    let mut h = Sha256::new();
    h.update(CACHE_FORMAT.as_bytes());
    h.update([0]);
    h.update(TRACT_VERSION.as_bytes());
    h.update([0]);
    h.update(onnx);
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Entry {
        tar: dir.join(format!("{key}.nnef.tar")),
        names: dir.join(format!("{key}.names")),
    }
}

fn read_entry(entry: &Entry) -> Option<(TypedModel, Names)> {
    let names = parse_names(&std::fs::read_to_string(&entry.names).ok()?)?;
    let model = crate::nnef::framework().model_for_path(&entry.tar).ok()?;
    (model.inputs.len() == names.inputs.len() && model.outputs.len() == names.outputs.len())
        .then_some((model, names))
}

fn write_entry(entry: &Entry, model: &TypedModel, names: &Names) -> TractResult<()> {
    let text = format_names(names).ok_or_else(|| TractError::msg("names not cacheable"))?;
    if let Some(dir) = entry.tar.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Write to temporary names, then rename: a concurrent reader never sees half a file, and
    // the names file (checked first on read) appears only once the archive is complete.
    let tmp = entry
        .tar
        .with_extension(format!("tmp{}", std::process::id()));
    let file = std::fs::File::create(&tmp)?;
    let result = crate::nnef::framework()
        .write_to_tar(model, std::io::BufWriter::new(file))
        .and_then(|w| w.into_inner().map_err(|e| e.into_error().into()))
        .and_then(|f| f.sync_all().map_err(Into::into))
        .and_then(|_| std::fs::rename(&tmp, &entry.tar).map_err(Into::into));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    let tmp = entry
        .names
        .with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &entry.names)?;
    Ok(())
}

/// `in\t<name>` and `out\t<name>` lines; `None` when a name would not survive the format.
fn format_names(names: &Names) -> Option<String> {
    let mut s = String::new();
    for (kind, list) in [("in", &names.inputs), ("out", &names.outputs)] {
        for n in list {
            if n.contains(['\n', '\r']) {
                return None;
            }
            s.push_str(&format!("{kind}\t{n}\n"));
        }
    }
    Some(s)
}

fn parse_names(text: &str) -> Option<Names> {
    let mut names = Names {
        inputs: vec![],
        outputs: vec![],
    };
    for line in text.lines() {
        match line.split_once('\t')? {
            ("in", n) => names.inputs.push(n.to_owned()),
            ("out", n) => names.outputs.push(n.to_owned()),
            _ => return None,
        }
    }
    Some(names)
}

fn from_onnx(path: &Path) -> Result<(TypedModel, Names), EngineError> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::Load {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    from_onnx_bytes(path, &bytes)
}

pub(crate) fn from_onnx_bytes(
    path: &Path,
    bytes: &[u8],
) -> Result<(TypedModel, Names), EngineError> {
    let load_err = |reason: String| EngineError::Load {
        path: path.to_owned(),
        reason,
    };
    let inference = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(bytes))
        .map_err(|e| load_err(format!("{e:#}")))?;
    let names = names_of(&inference).map_err(|e| load_err(format!("{e:#}")))?;
    let typed = inference
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .map_err(|e| load_err(format!("{e:#}")))?;
    Ok((typed, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let names = Names {
            inputs: vec!["a b".into(), "x".into()],
            outputs: vec!["y:0".into()],
        };
        assert_eq!(parse_names(&format_names(&names).unwrap()), Some(names));
        assert!(format_names(&Names {
            inputs: vec!["a\nb".into()],
            outputs: vec![]
        })
        .is_none());
        assert!(parse_names("bogus line").is_none());
    }
}
