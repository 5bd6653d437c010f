//! Loaded models shared between agents in one process (the simulated fleet).
//!
//! A real device runs one agent and has nothing to share with. A simulated fleet runs hundreds
//! to thousands of agents in one process, most of them serving the same few versions; loading
//! one model per device would bound the fleet by memory. A [`ModelCache`] handed to
//! every agent ([`crate::AgentConfig::share_models`]) lets them serve one loaded copy.
//!
//! What is shared is only what is identical: the cache is keyed by the sha256 of the model
//! file's bytes as the verified manifest records it (checked against the bytes while the bundle
//! was verified at install, and re-hashed at start-up), plus the engine options that change the
//! plan ([`ModelKey`]). Names and versions play no part: two bundles with the same model bytes
//! share an engine whatever they are called, two with different bytes never do. A backend reads
//! nothing but the model file's bytes (no external data beside it), so equal bytes loaded by the
//! same backend with the same options make an equal model.
//!
//! Everything else stays per device: each agent still verifies the bundle, writes its own slot,
//! checks the schema and runs the golden self-test (on the shared engine), and keeps its own
//! request metrics and health figures (they live in [`crate::serving::ServingModel`], not in the
//! engine). A [`LoadedModel`] is `Send + Sync` and runs with `&self` (tract's on pooled execution
//! states), so any number of agents' inference threads can run one engine at once.
//!
//! The cache holds [`Weak`] references: a model no agent serves any more is dropped as it would
//! be without sharing, and the next agent to need it loads it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::backend::{Backend, LoadedModel};

/// What makes two loads the same model: the same bytes, prepared the same way.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelKey {
    /// [`Backend::name`]: the same bytes loaded by two backends are two models.
    pub backend: &'static str,
    /// Hex sha256 of the decompressed model file, from the verified manifest's payload entry.
    pub model_sha256: String,
    /// [`engine::EngineOptions::threads`]: the plan's executor depends on it.
    /// (`cache_dir` only changes where the decluttered graph is read from, not the plan; the
    /// engine's `MODELFLEET_ENGINE_DEPTHWISE` switch is read from the environment and so is the
    /// same for every load in a process.)
    pub threads: usize,
    /// [`engine::EngineOptions::precision`]: a half-precision plan is another model.
    pub precision: engine::Precision,
}

impl ModelKey {
    pub fn new(
        backend: &dyn Backend,
        model_sha256: &str,
        opts: &engine::EngineOptions,
    ) -> ModelKey {
        ModelKey {
            backend: backend.name(),
            model_sha256: model_sha256.to_ascii_lowercase(),
            threads: opts.threads,
            precision: opts.precision,
        }
    }
}

/// One key's entry. Its own lock serialises loads of that key, so agents installing the same
/// version at once load it once; different keys load in parallel.
type Entry = Arc<Mutex<Weak<dyn LoadedModel>>>;

/// Loaded models by [`ModelKey`], held weakly. Cheap to share: put it in an `Arc`.
#[derive(Default)]
pub struct ModelCache {
    entries: Mutex<HashMap<ModelKey, Entry>>,
    loads: AtomicU64,
    hits: AtomicU64,
}

impl std::fmt::Debug for ModelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCache")
            .field("live", &self.live())
            .field("loads", &self.loads())
            .field("hits", &self.hits())
            .finish()
    }
}

impl ModelCache {
    pub fn new() -> ModelCache {
        ModelCache::default()
    }

    /// The live engine for `key` if some agent still holds it, else the one `load` makes (then
    /// shared with later callers). Returns the engine and whether it was already loaded.
    ///
    /// Concurrent callers with the same key wait for the first one's load and share its engine.
    /// A failed load is not remembered: the error goes to this caller, the next one tries again.
    pub fn get_or_load<E>(
        &self,
        key: &ModelKey,
        load: impl FnOnce() -> Result<Arc<dyn LoadedModel>, E>,
    ) -> Result<(Arc<dyn LoadedModel>, bool), E> {
        let entry = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            // Forget keys whose model is gone and that nobody is loading. An entry only the map
            // holds cannot be locked by anyone else, so `try_lock` only fails on poisoning.
            entries.retain(|_, e| {
                Arc::strong_count(e) > 1
                    || e.try_lock().map(|w| w.strong_count() > 0).unwrap_or(true)
            });
            entries
                .entry(key.clone())
                .or_insert_with(|| {
                    // Nothing loaded yet: a dangling `Weak` (it needs a sized type to be made).
                    let none: Weak<dyn LoadedModel> = Weak::<engine::Model>::new();
                    Arc::new(Mutex::new(none))
                })
                .clone()
        };
        let mut slot = entry.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(model) = slot.upgrade() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((model, true));
        }
        let model = load()?;
        self.loads.fetch_add(1, Ordering::Relaxed);
        *slot = Arc::downgrade(&model);
        Ok((model, false))
    }

    /// Distinct models loaded and still served by some agent.
    pub fn live(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.try_lock().map(|w| w.strong_count() > 0).unwrap_or(false))
            .count()
    }

    /// Models loaded through this cache (misses).
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Requests answered with an already loaded model.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn digits() -> Arc<dyn LoadedModel> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/models/digits_mlp/digits_mlp.onnx");
        let file = crate::backend::ModelFile {
            path: &path,
            format: protocol::manifest::ModelFormat::Onnx,
            inputs: &[],
            outputs: &[],
        };
        crate::backend::Tract
            .load(&file, &engine::EngineOptions::default())
            .unwrap()
    }

    fn key(sha: &str, threads: usize) -> ModelKey {
        ModelKey {
            backend: "tract",
            model_sha256: sha.into(),
            threads,
            precision: engine::Precision::F32,
        }
    }

    #[test]
    fn same_key_shares_until_the_last_holder_drops_it() {
        let cache = ModelCache::new();
        let (a, hit) = cache
            .get_or_load(&key("aa", 1), || Ok::<_, ()>(digits()))
            .unwrap();
        assert!(!hit);
        let (b, hit) = cache
            .get_or_load(&key("aa", 1), || -> Result<_, ()> {
                panic!("must not load again")
            })
            .unwrap();
        assert!(hit && Arc::ptr_eq(&a, &b));
        // Another hash or another thread count is another model.
        let (c, _) = cache
            .get_or_load(&key("bb", 1), || Ok::<_, ()>(digits()))
            .unwrap();
        let (d, _) = cache
            .get_or_load(&key("aa", 2), || Ok::<_, ()>(digits()))
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &c) && !Arc::ptr_eq(&a, &d));
        assert_eq!(cache.live(), 3);
        assert_eq!((cache.loads(), cache.hits()), (3, 1));
        // Weak: once nobody serves it, it is gone and loaded again on demand.
        drop((a, b, c, d));
        assert_eq!(cache.live(), 0);
        let (_e, hit) = cache
            .get_or_load(&key("aa", 1), || Ok::<_, ()>(digits()))
            .unwrap();
        assert!(!hit);
        assert_eq!(cache.entries.lock().unwrap().len(), 1, "dead keys pruned");
    }

    #[test]
    fn a_failed_load_is_not_remembered_and_concurrent_loads_happen_once() {
        let cache = Arc::new(ModelCache::new());
        assert_eq!(
            cache
                .get_or_load(&key("aa", 1), || Err::<Arc<dyn LoadedModel>, _>("broken"))
                .err(),
            Some("broken")
        );
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    cache
                        .get_or_load(&key("aa", 1), || Ok::<_, ()>(digits()))
                        .unwrap()
                        .0
                })
            })
            .collect();
        let models: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(models.iter().all(|m| Arc::ptr_eq(m, &models[0])));
        assert_eq!((cache.loads(), cache.hits()), (1, 3));
    }
}
