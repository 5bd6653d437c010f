//! `embedded-broker 127.0.0.1:PORT`: the fleet server's embedded rumqttd broker on its own, as a
//! process the end-to-end tests can kill and restart (an in-process rumqttd cannot be stopped).
//! Operators get the same from `fleet-server broker --listen ADDR`.

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let addr = std::env::args()
        .nth(1)
        .context("usage: embedded-broker 127.0.0.1:PORT")?;
    let addr = addr
        .parse()
        .with_context(|| format!("'{addr}' is not an address"))?;
    let _broker = fleet_server::broker::EmbeddedBroker::start(addr)?;
    loop {
        std::thread::park();
    }
}
