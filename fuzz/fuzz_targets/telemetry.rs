//! Server side, `{p}/devices/{id}/telemetry`: arbitrary bytes into the server's telemetry
//! decoder (`fleet_server::ingest::decode_telemetry`: size cap, JSON, schema); a decoded record
//! into the in-memory windows (`Telemetry::record`) and back out, and a window into the cohort
//! figures the rollout gates judge (`CohortFigures::add_window`, twice, then `judge`), since a
//! device chooses every number in it. Needs `--features server`.
#![no_main]

use fleet_server::ingest::decode_telemetry;
use fleet_server::rollout::gates::{judge, CohortFigures, Gates};
use fleet_server::telemetry::Telemetry;
use fuzz_support::FUZZ_DEVICE;
use libfuzzer_sys::fuzz_target;
use protocol::telemetry::TelemetryRecord;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = decode_telemetry(data) else {
        return;
    };
    if let TelemetryRecord::Window(w) = &record {
        let mut canary = CohortFigures::default();
        canary.add_window(w);
        canary.add_window(w);
        let _ = judge(&canary, Some(&CohortFigures::default()), &Gates::default());
        let _ = judge(&canary, Some(&canary), &Gates::default());
    }
    let model = record.model().to_string();
    let telemetry = Telemetry::default();
    telemetry.record(FUZZ_DEVICE, record);
    let _ = telemetry.windows(FUZZ_DEVICE, Some(&model), None);
    let _ = telemetry.samples(FUZZ_DEVICE, &model);
});
