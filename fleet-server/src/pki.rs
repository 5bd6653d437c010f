//! The fleet CA and the certificates of mutual TLS between devices and the broker.
//!
//! `fleet-server issue-device-cert --ca-dir DIR --device-id ID --out DIR` creates the CA on
//! first use (`DIR/ca.pem`, and `DIR/ca.key` readable by its owner only — keep that directory
//! off the broker and off devices) and issues a client certificate whose CN is the device id.
//! The broker (Mosquitto: `require_certificate true`, `use_identity_as_username true`,
//! `use_username_as_clientid true`) then takes the CN as the device's name, and the ACL of
//! [`crate::isolation`] confines it to its own topics. [`issue_server_cert`] issues the broker's
//! own certificate and [`issue_identity_cert`] the fleet server's client certificate
//! (CN [`crate::isolation::SERVER_IDENTITY`], which no device id can be). `docs/security.md`
//! walks through provisioning.
//!
//! Keys are ECDSA P-256; certificates are valid for ten years (devices in the field are not
//! re-provisioned lightly). Revocation is the broker's business (Mosquitto `crlfile`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const CA_NAME: &str = "modelfleet fleet CA";
const VALID_DAYS: u64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("CA directory {0} holds only one of ca.pem and ca.key")]
    HalfCa(String),
    #[error(transparent)]
    DeviceId(#[from] protocol::link::LinkError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path` through a temp file and a rename; `secret` files are mode 0600.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut p);
    Ok(p)
}

fn validity(p: &mut CertificateParams) {
    use chrono::Datelike;
    let ymd = |d: chrono::NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    let today = chrono::Utc::now().date_naive();
    p.not_before = ymd(today - chrono::Days::new(1));
    p.not_after = ymd(today + chrono::Days::new(VALID_DAYS));
}

/// The fleet CA in `dir`, created (key and self-signed certificate) if the directory has none.
/// Returns the issuer and the path of `ca.pem`.
pub fn open_or_create_ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, PathBuf), PkiError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&pem)?;
            // The issuer's name and key identifier come from these parameters and the key,
            // exactly as when the CA certificate was made.
            Ok((Issuer::new(ca_params()?, key), cert_path))
        }
        (false, false) => {
            let key = KeyPair::generate()?;
            let params = ca_params()?;
            let cert = params.self_signed(&key)?;
            write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
            write_file(&cert_path, cert.pem().as_bytes(), false)?;
            Ok((Issuer::new(params, key), cert_path))
        }
        _ => Err(PkiError::HalfCa(dir.display().to_string())),
    }
}

/// Files of one issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A copy of the CA certificate (what the holder trusts the broker with).
    pub ca: PathBuf,
}

fn issue(
    ca_dir: &Path,
    cn: &str,
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    out: &Path,
    stem: &str,
) -> Result<Issued, PkiError> {
    let (issuer, ca_pem) = open_or_create_ca(ca_dir)?;
    fs::create_dir_all(out).map_err(io(out))?;
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    validity(&mut p);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    let issued = Issued {
        cert: out.join(format!("{stem}.pem")),
        key: out.join(format!("{stem}.key")),
        ca: out.join("ca.pem"),
    };
    write_file(&issued.key, key.serialize_pem().as_bytes(), true)?;
    write_file(&issued.cert, cert.pem().as_bytes(), false)?;
    let ca = fs::read(&ca_pem).map_err(io(&ca_pem))?;
    if issued.ca != ca_pem {
        write_file(&issued.ca, &ca, false)?;
    }
    Ok(issued)
}

/// A device's client certificate: CN = `device_id` (checked like every device id), written
/// as `OUT/ID.pem`, `OUT/ID.key` and `OUT/ca.pem`.
pub fn issue_device_cert(ca_dir: &Path, device_id: &str, out: &Path) -> Result<Issued, PkiError> {
    protocol::link::check_device_id(device_id)?;
    issue(
        ca_dir,
        device_id,
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        out,
        device_id,
    )
}

/// A client certificate for a non-device identity (the fleet server, a telemetry reader).
pub fn issue_identity_cert(ca_dir: &Path, cn: &str, out: &Path) -> Result<Issued, PkiError> {
    let stem: String = cn
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    issue(
        ca_dir,
        cn,
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        out,
        &stem,
    )
}

/// The broker's server certificate for `names` (DNS names or IP addresses), as `OUT/broker.pem`.
pub fn issue_server_cert(ca_dir: &Path, names: &[String], out: &Path) -> Result<Issued, PkiError> {
    let cn = names.first().map_or("broker", String::as_str).to_string();
    issue(
        ca_dir,
        &cn,
        names.to_vec(),
        ExtendedKeyUsagePurpose::ServerAuth,
        out,
        "broker",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_made_once_and_device_ids_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let a = issue_device_cert(&ca, "dev-a", &dir.path().join("a")).unwrap();
        let ca_pem = fs::read(ca.join("ca.pem")).unwrap();
        let b = issue_device_cert(&ca, "dev-b", &dir.path().join("b")).unwrap();
        assert_eq!(
            fs::read(ca.join("ca.pem")).unwrap(),
            ca_pem,
            "the CA is reused"
        );
        assert_eq!(fs::read(&b.ca).unwrap(), ca_pem);
        assert_ne!(fs::read(&a.cert).unwrap(), fs::read(&b.cert).unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [ca.join("ca.key"), a.key.clone()] {
                let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
        }
        assert!(matches!(
            issue_device_cert(&ca, "fleet-server@fleet", dir.path()),
            Err(PkiError::DeviceId(_))
        ));
        fs::remove_file(ca.join("ca.pem")).unwrap();
        assert!(matches!(
            issue_device_cert(&ca, "dev-c", dir.path()),
            Err(PkiError::HalfCa(_))
        ));
    }
}
