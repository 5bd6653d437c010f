//! The MQTT session's options: broker URL, TLS (rustls with the ring provider, the broker
//! verified against a CA file, optional client certificate), persistent session, keep-alive, the
//! retained last will, and packet size limits large enough for chunk frames.

use std::fs;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use protocol::link::{self, Channel, DeviceStatus, Topics, MAX_CHUNK_SIZE};

use super::{LinkConfig, LinkError, TlsFiles};

/// Where the broker is and whether to speak TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// Parses `mqtt://host[:port]` (plain, default port 1883) or `mqtts://host[:port]` (TLS, 8883).
pub fn parse_broker_url(url: &str) -> Result<BrokerAddress, LinkError> {
    let bad = |why: &str| LinkError::BadUrl {
        url: url.to_string(),
        reason: why.to_string(),
    };
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(bad("use mqtt://HOST:PORT or mqtts://HOST:PORT"));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('@') || rest.contains('?') {
        return Err(bad("only HOST:PORT may follow the scheme"));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, tail) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None if tail.is_empty() => default_port,
            None => return Err(bad("junk after ']'")),
        };
        (host.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(BrokerAddress { tls, host, port })
}

/// Largest packet the session sends or accepts: a chunk frame of the largest chunk size plus
/// the topic and MQTT header.
pub fn max_packet_size() -> usize {
    link::max_frame_len(MAX_CHUNK_SIZE) + 1024
}

/// The rumqttc options of a device's session.
pub fn mqtt_options(config: &LinkConfig, topics: &Topics) -> Result<MqttOptions, LinkError> {
    let addr = parse_broker_url(&config.broker_url)?;
    let mut options = MqttOptions::new(config.device_id.clone(), addr.host.clone(), addr.port);
    options
        .set_clean_session(false)
        .set_keep_alive(config.keep_alive)
        .set_max_packet_size(max_packet_size(), max_packet_size())
        .set_inflight(100)
        .set_last_will(LastWill::new(
            topics.device(&config.device_id, Channel::Status),
            link::encode(&DeviceStatus::last_will(&config.device_id)),
            QoS::AtLeastOnce,
            true,
        ));
    if addr.tls {
        let files = config.tls.as_ref().ok_or_else(|| LinkError::BadUrl {
            url: config.broker_url.clone(),
            reason: "mqtts:// needs a CA file (--ca-file) to verify the broker".into(),
        })?;
        let tls = rustls_config(files)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    Ok(options)
}

/// A rustls client configuration: ring provider, roots from the CA file, optional client
/// certificate and key for mutual TLS.
pub fn rustls_config(files: &TlsFiles) -> Result<rustls::ClientConfig, LinkError> {
    let mut roots = rustls::RootCertStore::empty();
    let cas = read_certs(&files.ca_file)?;
    if cas.is_empty() {
        return Err(tls_err(&files.ca_file, "no certificate in the file"));
    }
    for cert in cas {
        roots.add(cert).map_err(|e| tls_err(&files.ca_file, e))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_err(&files.ca_file, e))?
    .with_root_certificates(roots);
    match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            let key_der = rustls_pemfile::private_key(&mut BufReader::new(
                fs::read(key).map_err(|e| tls_err(key, e))?.as_slice(),
            ))
            .map_err(|e| tls_err(key, e))?
            .ok_or_else(|| tls_err(key, "no private key in the file"))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| tls_err(cert, e))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(p), None) | (None, Some(p)) => Err(tls_err(
            p,
            "a client certificate needs both --client-cert and --client-key",
        )),
    }
}

fn read_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, LinkError> {
    let bytes = fs::read(path).map_err(|e| tls_err(path, e))?;
    rustls_pemfile::certs(&mut BufReader::new(bytes.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(path, e))
}

fn tls_err(path: &Path, e: impl std::fmt::Display) -> LinkError {
    LinkError::Tls {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let a = parse_broker_url("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((a.tls, a.host.as_str(), a.port), (false, "127.0.0.1", 1884));
        let a = parse_broker_url("mqtts://broker.example").unwrap();
        assert_eq!((a.tls, a.port), (true, 8883));
        let a = parse_broker_url("mqtt://[::1]:1999").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 1999));
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:x",
            "mqtt://u@h:1",
            "mqtt://h:1/path",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mqtts_without_a_ca_file_is_refused() {
        let mut c = LinkConfig::new("mqtts://127.0.0.1:8883", "dev-1");
        c.tls = None;
        let err = mqtt_options(&c, &Topics::default()).unwrap_err();
        assert!(err.to_string().contains("CA file"), "{err}");
    }
}
