#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
}

pub fn model(name: &str, file: &str) -> PathBuf {
    models().join(name).join(file)
}

pub fn bundler(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_bundler"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("run bundler");
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Files in `dir` (names only), sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs `bundler keygen` in `dir` with `name`; returns the key id it printed.
pub fn keygen(dir: &Path, name: &str) -> String {
    let o = bundler(&[&"keygen", &"--out-dir", &dir, &"--name", &name]);
    assert!(o.status.success(), "keygen failed: {}", stderr(&o));
    stdout(&o).trim().to_string()
}
