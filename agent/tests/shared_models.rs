//! Agents in one process sharing loaded models (`AgentConfig::share_models`, what the simulated
//! fleet does): identical model bytes share one engine, anything else does not, and each agent
//! keeps its own slots, self-test, metrics and health.

mod common;

use std::path::Path;
use std::sync::Arc;

use agent::model_cache::ModelCache;
use agent::{Agent, AgentConfig};
use common::*;

fn open(fx: &Fixture, data: &Path, cache: Option<&Arc<ModelCache>>) -> Agent {
    let keyring =
        protocol::keys::Keyring::from_file_text(&std::fs::read_to_string(&fx.keyring).unwrap())
            .unwrap();
    let mut config = AgentConfig::new(data);
    config.workers = 1;
    config.share_models = cache.cloned();
    Agent::open(config, keyring).unwrap()
}

fn install(agent: &Agent, bundle: &Path) {
    agent.install(&std::fs::read(bundle).unwrap()).unwrap();
}

fn engine(agent: &Agent, model: &str) -> Arc<dyn agent::backend::LoadedModel> {
    agent.registry.get(model).unwrap().engine.clone()
}

#[test]
fn agents_with_one_cache_share_an_engine_only_for_identical_model_bytes() {
    let fx = Fixture::new();
    let v1 = fx.bundle("digits_cnn", "1.0.0", 1);
    // Same model file, another version (and signature): same bytes, so the same engine.
    let v1_again = fx.bundle("digits_cnn", "1.0.1", 1);
    // Same name, other bytes.
    let perturbed = fx.bundle_with("digits_cnn", "2.0.0", 1, |o| {
        o.model = models_dir().join("regressed/digits_cnn_perturbed.onnx")
    });
    let mlp = fx.bundle("digits_mlp", "1.0.0", 1);

    let cache = Arc::new(ModelCache::new());
    let (data_a, data_b) = (fx.path("a"), fx.path("b"));
    let a = open(&fx, &data_a, Some(&cache));
    let mut b = open(&fx, &data_b, Some(&cache));
    install(&a, &v1);
    install(&b, &v1);
    assert!(Arc::ptr_eq(
        &engine(&a, "digits_cnn"),
        &engine(&b, "digits_cnn")
    ));
    assert_eq!((cache.loads(), cache.hits(), cache.live()), (1, 1, 1));

    // Each device still has its own verified slot and its own serving state.
    for data in [&data_a, &data_b] {
        let slots: Vec<_> = std::fs::read_dir(data.join("slots/digits_cnn"))
            .unwrap()
            .collect();
        assert_eq!(slots.len(), 1, "{}", data.display());
    }
    let served_a = a.registry.get("digits_cnn").unwrap();
    let served_b = b.registry.get("digits_cnn").unwrap();
    assert!(!Arc::ptr_eq(&served_a, &served_b));
    let inputs = engine::npy::read_npy(models_dir().join("digits_cnn/test_input.npy")).unwrap();
    let body = json_request("input", &sample(&inputs, 0)).to_string();
    agent::http::serve_request(&served_a, body.as_bytes(), None).unwrap();
    let requests = |m: &agent::serving::ServingModel| {
        m.metrics
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!((requests(&served_a), requests(&served_b)), (1, 0));
    assert_eq!(
        (
            served_a.health.recent().requests,
            served_b.health.recent().requests
        ),
        (1, 0)
    );
    drop((served_a, served_b));

    // Same bytes under another version share; the key is the manifest's hash, not the name.
    install(&a, &v1_again);
    assert_eq!(a.registry.get("digits_cnn").unwrap().version(), "1.0.1");
    assert!(Arc::ptr_eq(
        &engine(&a, "digits_cnn"),
        &engine(&b, "digits_cnn")
    ));

    // A restart re-hashes the slot, self-tests, and shares again.
    drop(b);
    b = open(&fx, &data_b, Some(&cache));
    assert!(Arc::ptr_eq(
        &engine(&a, "digits_cnn"),
        &engine(&b, "digits_cnn")
    ));
    assert_eq!(cache.loads(), 1);

    // Another model, and the same name with other bytes, each get an engine of their own.
    install(&b, &mlp);
    assert!(!Arc::ptr_eq(
        &engine(&b, "digits_mlp"),
        &engine(&a, "digits_cnn")
    ));
    install(&b, &perturbed);
    assert_eq!(b.registry.get("digits_cnn").unwrap().version(), "2.0.0");
    assert!(!Arc::ptr_eq(
        &engine(&a, "digits_cnn"),
        &engine(&b, "digits_cnn")
    ));
    assert_eq!((cache.loads(), cache.live()), (3, 3));

    // The shared engine still has to pass each slot's own golden self-test: a slot whose golden
    // outputs do not match is refused even though its model is loaded already.
    let manifest_of = |slot: &Path| {
        protocol::bundle::parse_manifest(&std::fs::read(slot.join("manifest.json")).unwrap())
            .unwrap()
    };
    let slot_a = std::fs::read_dir(data_a.join("slots/digits_cnn"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("1.0.1-")
        })
        .unwrap();
    let broken = fx.path("broken-slot");
    std::fs::create_dir_all(&broken).unwrap();
    let model_file = manifest_of(&slot_a).model_file;
    for f in ["manifest.json", model_file.as_str(), "golden.bin"] {
        std::fs::copy(slot_a.join(f), broken.join(f)).unwrap();
    }
    let mut golden = std::fs::read(broken.join("golden.bin")).unwrap();
    let n = golden.len();
    golden[n - 4..].copy_from_slice(&1e6f32.to_le_bytes());
    std::fs::write(broken.join("golden.bin"), golden).unwrap();
    let hits = cache.hits();
    let manifest = manifest_of(&broken);
    let err = agent::install::load_slot(
        &broken,
        &manifest,
        &agent::backend::Tract,
        &engine::EngineOptions::default(),
        true,
        Some(&cache),
    )
    .err()
    .expect("a wrong golden set is refused on a shared engine");
    assert_eq!(err.reason(), "golden_self_test", "{err}");
    assert_eq!(cache.hits(), hits + 1, "the engine came from the cache");
    // The intact slot passes on the same shared engine.
    let (shared, _) = agent::install::load_slot(
        &slot_a,
        &manifest_of(&slot_a),
        &agent::backend::Tract,
        &engine::EngineOptions::default(),
        true,
        Some(&cache),
    )
    .unwrap();
    assert!(Arc::ptr_eq(&shared, &engine(&a, "digits_cnn")));
}

#[test]
fn agents_without_a_cache_load_their_own_engine() {
    let fx = Fixture::new();
    let v1 = fx.bundle("digits_cnn", "1.0.0", 1);
    let a = open(&fx, &fx.path("a"), None);
    let b = open(&fx, &fx.path("b"), None);
    install(&a, &v1);
    install(&b, &v1);
    assert!(!Arc::ptr_eq(
        &engine(&a, "digits_cnn"),
        &engine(&b, "digits_cnn")
    ));
}

#[test]
fn a_simulated_fleet_shares_one_cache() {
    let c = agent::simulate::SimConfig::new(
        3,
        "mqtt://127.0.0.1:1",
        protocol::keys::Keyring::new([]),
        std::path::PathBuf::from("/nonexistent"),
    );
    assert!(c.agent.share_models.is_some());
    // Every device's config is a clone of this one, so they hold the same cache.
    let device = c.agent.clone();
    assert!(Arc::ptr_eq(
        device.share_models.as_ref().unwrap(),
        c.agent.share_models.as_ref().unwrap()
    ));
}
