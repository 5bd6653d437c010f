//! Real infrastructure for end-to-end tests and examples: brokers on free loopback ports and
//! TLS certificates made on the spot.
//!
//! - [`Mosquitto`] runs the system's `mosquitto` binary (Debian package `mosquitto`) on a free
//!   port, plain or TLS (optionally requiring client certificates), and can be killed and
//!   restarted on the same port to simulate a broker outage.
//! - [`BrokerProcess`] is the same for the embedded rumqttd broker, run as its own process
//!   (`embedded-broker`, a binary of this package) so that it too can be killed.
//! - [`TestCerts`] generates a CA, a server certificate for `localhost`/`127.0.0.1` and a client
//!   certificate, as PEM files.
//!
//! Nothing here talks to anything but 127.0.0.1.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A port nobody listens on right now (bind :0, read it, release it), and one this process has
/// not handed out before: two brokers started at the same moment by parallel tests never get
/// the same port. (Another process can still take it before the caller binds it; the brokers
/// here check that the listener they find is their own.)
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding 127.0.0.1:0");
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing accepted connections on 127.0.0.1:{port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `check` until it returns `Some`, or fails naming `what` after `timeout`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// PEM files of a throw-away PKI: a CA, a server certificate and a client certificate.
#[derive(Debug, Clone)]
pub struct TestCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestCerts {
    /// Writes the files into `dir` (created if missing).
    pub fn generate(dir: &Path) -> Result<TestCerts> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        fs::create_dir_all(dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "modelfleet test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, cn: &str| -> Result<(String, String)> {
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_pem, server_key) = leaf(
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
            "localhost",
        )?;
        let (client_pem, client_key) = leaf(vec!["device".to_string()], "device")?;

        let certs = TestCerts {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        fs::write(&certs.ca, ca_cert.pem())?;
        fs::write(&certs.server_cert, server_pem)?;
        fs::write(&certs.server_key, server_key)?;
        fs::write(&certs.client_cert, client_pem)?;
        fs::write(&certs.client_key, client_key)?;
        Ok(certs)
    }
}

/// A broker running as a child process on a fixed loopback port; killed on drop.
pub struct BrokerProcess {
    port: u16,
    tls: bool,
    command: Command,
    child: Option<Child>,
    name: &'static str,
}

impl BrokerProcess {
    /// `mqtt://127.0.0.1:PORT` or `mqtts://localhost:PORT` (TLS: the certificate names localhost).
    pub fn url(&self) -> String {
        if self.tls {
            format!("mqtts://localhost:{}", self.port)
        } else {
            format!("mqtt://127.0.0.1:{}", self.port)
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the broker at once (SIGKILL: no goodbye to clients, nothing saved).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// Starts a broker on a free port, `command(port)` being how; tries other ports when the one
    /// picked was taken by another process meanwhile.
    fn start_on_free_port(
        name: &'static str,
        tls: bool,
        command: impl Fn(u16) -> Result<Command>,
    ) -> Result<BrokerProcess> {
        let mut tries = 0;
        loop {
            let port = free_port();
            let mut broker = BrokerProcess {
                port,
                tls,
                command: command(port)?,
                child: None,
                name,
            };
            match broker.spawn() {
                Ok(()) => return Ok(broker),
                Err(e) if tries < 2 => {
                    tries += 1;
                    eprintln!("{e:#}; trying another port");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts the child and waits until it accepts connections on its port on a socket of its
    /// own: a port another process took (which the child then fails to bind) is an error, not a
    /// broker that is silently someone else's.
    fn spawn(&mut self) -> Result<()> {
        let child = self
            .command
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        let pid = child.id();
        let child = self.child.insert(child);
        // The port may still be in TIME_WAIT from the previous incarnation; SO_REUSEADDR
        // (both brokers set it) makes that harmless.
        let timeout = Duration::from_secs(20);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "{} exited ({status}) before it listened on 127.0.0.1:{}",
                    self.name,
                    self.port
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                match listener_is_of(pid, self.port) {
                    Some(true) | None => return Ok(()),
                    Some(false) => {}
                }
            }
            if Instant::now() > deadline {
                self.kill();
                bail!(
                    "{} did not listen on 127.0.0.1:{} within {timeout:?} (another process may \
                     hold the port)",
                    self.name,
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The embedded rumqttd broker, as the `embedded-broker` binary of this package.
    /// `exe` is its path: `env!("CARGO_BIN_EXE_embedded-broker")` in this package's tests.
    pub fn embedded(exe: &Path) -> Result<BrokerProcess> {
        BrokerProcess::start_on_free_port("the embedded broker", false, |port| {
            let mut command = Command::new(exe);
            command
                .arg(format!("127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            Ok(command)
        })
    }

    /// Mosquitto on a free port, configured in `dir`. With `tls`, it serves TLS with the
    /// given certificates and, if `require_client_cert`, demands a client certificate.
    pub fn mosquitto(
        dir: &Path,
        tls: Option<&TestCerts>,
        require_client_cert: bool,
    ) -> Result<BrokerProcess> {
        let listener = match tls {
            Some(certs) => format!(
                "allow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
                certs.ca.display(),
                certs.server_cert.display(),
                certs.server_key.display(),
                require_client_cert
            ),
            None => "allow_anonymous true\n".to_string(),
        };
        BrokerProcess::mosquitto_with(dir, &listener, tls.is_some())
    }

    /// Mosquitto on a free port with `listener_conf` (lines after `listener PORT 127.0.0.1`,
    /// e.g. TLS, `acl_file`, `password_file`); `tls` says whether those lines make it TLS.
    pub fn mosquitto_with(dir: &Path, listener_conf: &str, tls: bool) -> Result<BrokerProcess> {
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context(
                "mosquitto is not installed (Debian: apt-get install -y mosquitto); \
                 the Mosquitto suites need it",
            )?;
        fs::create_dir_all(dir)?;
        BrokerProcess::start_on_free_port("mosquitto", tls, |port| {
            // `user root`: started as root, Mosquitto would otherwise drop to user `mosquitto`,
            // who cannot read the test's private files.
            let conf = format!(
                "user root\npersistence false\nlog_dest stderr\n\
                 max_queued_messages 100000\nset_tcp_nodelay true\nlistener {port} 127.0.0.1\n{listener_conf}"
            );
            let conf_path = dir.join(format!("mosquitto-{port}.conf"));
            fs::write(&conf_path, conf)?;
            let log = fs::File::create(dir.join(format!("mosquitto-{port}.log")))?;
            let mut command = Command::new(&exe);
            command
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            Ok(command)
        })
    }
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port` (Linux: `/proc/net/tcp`
/// names the listening socket's inode, `/proc/PID/fd` the process's sockets); `None` where
/// `/proc` cannot tell.
fn listener_is_of(pid: u32, port: u16) -> Option<bool> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("{:08X}:{port:04X}", u32::from_ne_bytes([127, 0, 0, 1]));
    let sockets: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            const LISTEN: &str = "0A";
            let listening =
                fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&LISTEN);
            let inode = fields.get(9).filter(|_| listening)?;
            Some(format!("socket:[{inode}]"))
        })
        .collect();
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .is_ok_and(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str()))
    }))
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Classifies every row of `inputs_npy` through `POST {url}/v2/models/{model}/infer` (OIP v2
/// JSON, one row per request, first input named `input_name`) and returns the accuracy against
/// `labels_npy` — the figure a bundle records, so a caller can check that a device serves the
/// model exactly as it was built.
pub fn oip_accuracy(
    url: &str,
    model: &str,
    input_name: &str,
    inputs_npy: &Path,
    labels_npy: &Path,
) -> Result<f64> {
    let inputs = engine::npy::read_npy(inputs_npy)?;
    let labels = match engine::npy::read_npy(labels_npy)?.data {
        engine::TensorData::I32(v) => v.into_iter().map(i64::from).collect::<Vec<_>>(),
        engine::TensorData::I64(v) => v,
        _ => bail!("labels in {} are not integers", labels_npy.display()),
    };
    let pixels = inputs.as_f32().context("inputs are not f32")?;
    let per: usize = inputs.shape[1..].iter().product();
    let mut shape = inputs.shape.clone();
    shape[0] = 1;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let mut correct = 0;
    for (i, label) in labels.iter().enumerate() {
        let request = serde_json::json!({"inputs": [{"name": input_name, "datatype": "FP32",
            "shape": shape, "data": &pixels[i * per..(i + 1) * per]}]});
        let response: serde_json::Value = agent
            .post(&format!("{url}/v2/models/{model}/infer"))
            .send_json(request)
            .with_context(|| format!("inference request {i} to {url}"))?
            .into_json()?;
        let scores: Vec<f32> = serde_json::from_value(response["outputs"][0]["data"].clone())
            .with_context(|| format!("answer {i} has no output data: {response}"))?;
        let predicted = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        correct += (predicted == Some(*label as usize)) as usize;
    }
    Ok(correct as f64 / labels.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_told_apart_from_another_process_s() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_is_of(std::process::id(), port), Some(true));
        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        let of_other = listener_is_of(other.id(), port);
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(of_other, Some(false));
        drop(listener);
        assert_eq!(listener_is_of(std::process::id(), port), Some(false));
    }
}
