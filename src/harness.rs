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

/// A port nobody listens on right now (bind :0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
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

    fn spawn(&mut self) -> Result<()> {
        let child = self
            .command
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        // The port may still be in TIME_WAIT from the previous incarnation; SO_REUSEADDR
        // (both brokers set it) makes that harmless, so waiting for accept is enough.
        wait_for_port(self.port, Duration::from_secs(20))
            .with_context(|| format!("{} did not come up", self.name))
    }

    /// The embedded rumqttd broker, as the `embedded-broker` binary of this package.
    /// `exe` is its path: `env!("CARGO_BIN_EXE_embedded-broker")` in this package's tests.
    pub fn embedded(exe: &Path) -> Result<BrokerProcess> {
        let port = free_port();
        let mut command = Command::new(exe);
        command
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut broker = BrokerProcess {
            port,
            tls: false,
            command,
            child: None,
            name: "the embedded broker",
        };
        broker.spawn()?;
        Ok(broker)
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
        let port = free_port();
        // `user root`: started as root, Mosquitto would otherwise drop to user `mosquitto`,
        // who cannot read the test's private files.
        let conf = format!(
            "user root\npersistence false\nlog_dest stderr\n\
             max_queued_messages 100000\nset_tcp_nodelay true\nlistener {port} 127.0.0.1\n{listener_conf}"
        );
        let conf_path = dir.join(format!("mosquitto-{port}.conf"));
        fs::write(&conf_path, conf)?;
        let log = fs::File::create(dir.join(format!("mosquitto-{port}.log")))?;
        let mut command = Command::new(exe);
        command
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut broker = BrokerProcess {
            port,
            tls,
            command,
            child: None,
            name: "mosquitto",
        };
        broker.spawn()?;
        Ok(broker)
    }
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
