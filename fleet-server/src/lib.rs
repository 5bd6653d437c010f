//! The fleet server: device registry, bundle store, MQTT link, telemetry ingest and rollouts.
